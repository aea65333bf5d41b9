from __future__ import annotations

from streamd.settings import Settings


def test_env_then_flags() -> None:
    env = {"STREAMD_PORT": "9000", "STREAMD_HOST": "0.0.0.0", "STREAMD_LOG_JSON": "true", "STREAMD_REDIS_URL": ""}
    s = Settings.from_env(env, host="10.0.0.1", port=None)
    assert s.port == 9000  # from the environment
    assert s.host == "10.0.0.1"  # a flag wins
    assert s.log_json is True
    assert s.redis_url is None  # empty means unset
    assert Settings.from_env({}) == Settings()


def test_every_limit_is_finite() -> None:
    s = Settings()
    for name in ("max_body_bytes", "max_frame_bytes", "max_subscriptions", "feed_history_len", "socket_buffer_bytes"):
        assert 0 < getattr(s, name) < 2**31
