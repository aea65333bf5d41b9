// <streamd-feed>: one streamd feed, live, in any page. No dependencies.
// Runs under a strict CSP: styles are constructable stylesheets, text goes in
// with textContent only, nothing is eval'd or parsed as HTML (Trusted Types
// safe). Attributes, events, parts and custom properties: web/README.md.

const HTTP = new URL(import.meta.url).origin;
const WS = HTTP.replace(/^http/, 'ws') + '/v1/ws';
const DEFAULTS = { limit: '20', theme: 'auto', height: '480px', mode: 'auto' };
const LABELS = { image: 'Image', video: 'Video', audio: 'Audio', link: 'Link' };

const DARK = '--bg:var(--streamd-bg,#16181c);--fg:var(--streamd-fg,#e7e9ea);--mu:var(--streamd-muted,#8b98a5);' +
  '--ac:var(--streamd-accent,#4aa3ff);--bd:var(--streamd-border,#2f3336);--cd:var(--streamd-card-bg,#202327)';
const sheet = new CSSStyleSheet();
sheet.replaceSync(`
:host{display:block;height:var(--_h);contain:content;font:var(--streamd-font-size,15px)/1.45 var(--streamd-font,system-ui,-apple-system,"Segoe UI",Roboto,sans-serif)}
[hidden]{display:none!important}
.r{--bg:var(--streamd-bg,#fff);--fg:var(--streamd-fg,#0f1419);--mu:var(--streamd-muted,#536471);--ac:var(--streamd-accent,#0b63ce);--bd:var(--streamd-border,#e1e6ea);--cd:var(--streamd-card-bg,#f2f5f7);
position:relative;box-sizing:border-box;height:100%;display:flex;flex-direction:column;overflow:hidden;background:var(--bg);color:var(--fg);border:1px solid var(--bd);border-radius:var(--streamd-radius,12px)}
.d{${DARK};color-scheme:dark}
@media (prefers-color-scheme:dark){.a{${DARK};color-scheme:dark}}
header{flex:none;display:flex;align-items:center;gap:.55em;padding:.6em .9em;border-bottom:1px solid var(--bd)}
.dot{flex:none;width:.55em;height:.55em;border-radius:50%;background:var(--mu)}
.on .dot{background:var(--streamd-live,#16a34a)}
.ti{flex:1;min-width:0;font-weight:650;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.st{font-size:.8em;color:var(--mu)}
::slotted(a){color:inherit;text-decoration:none}
button{font:inherit;font-size:.8em;color:var(--fg);background:none;border:1px solid var(--bd);border-radius:99px;padding:.2em .8em;cursor:pointer}
button:focus-visible,article:focus-visible,.c:focus-visible{outline:2px solid var(--ac);outline-offset:-2px}
.b{position:relative;flex:1;min-height:0}
.l{position:relative;height:100%;overflow-y:auto;overscroll-behavior:contain}
.sp{height:100%}
.n{position:absolute;z-index:1;top:.6em;left:50%;transform:translateX(-50%);background:var(--ac);color:#fff;border:0;font-weight:600;box-shadow:0 2px 8px #0004}
.e{position:absolute;inset:0;margin:0;display:grid;place-items:center;padding:1em;text-align:center;color:var(--mu)}
article{padding:.7em .9em;border-bottom:1px solid var(--bd)}
.m{display:flex;gap:.5em;align-items:baseline;font-size:.85em;color:var(--mu)}
.au{font-weight:650;color:var(--fg)}
.t{margin:.2em 0 0;white-space:pre-wrap;overflow-wrap:anywhere}
.md{display:grid;grid-template-columns:repeat(auto-fit,minmax(9em,1fr));gap:.4em;max-width:30em;margin-top:.55em}
.c{display:block;aspect-ratio:16/9;overflow:hidden;border:1px solid var(--bd);border-radius:8px;background:var(--cd);color:var(--mu);text-decoration:none}
.c img{display:block;width:100%;height:100%;object-fit:cover}
.c span{display:grid;place-items:center;height:100%;padding:0 .6em;font-size:.85em;text-align:center}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip-path:inset(50%);white-space:nowrap}
@media (prefers-reduced-motion:no-preference){.l{scroll-behavior:smooth}.fr{animation:fr 1.5s ease-out}@keyframes fr{from{background:var(--cd)}}}
`);

// One timer for every widget on the page: socket deadlines every second,
// relative times every 15 s.
const widgets = new Set();
let timer = 0, ticks = 0;
function track(el, on) {
  on ? widgets.add(el) : widgets.delete(el);
  if (widgets.size && !timer) timer = setInterval(() => { const times = !(++ticks % 15); widgets.forEach((w) => w._tick(times)); }, 1000);
  if (!widgets.size && timer) timer = clearInterval(timer) || 0;
}

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  e.append(...kids); // strings become text nodes, never markup
  return e;
}

// Post ids are `<ms>-<seq>`, unique and time-ordered (PROTOCOL.md).
function newer(a, b) {
  const [x, y] = a.split('-').map(Number), [u, v] = b.split('-').map(Number);
  return x > u || (x === u && y > v);
}

const UNITS = [['year', 31536e3], ['month', 2592e3], ['week', 604800], ['day', 86400], ['hour', 3600], ['minute', 60]];
function ago(ms, rtf) {
  const s = (ms - Date.now()) / 1000;
  for (const [unit, n] of UNITS) if (-s >= n) return rtf.format(Math.round(s / n), unit);
  return rtf.format(0, 'second');
}
function intl(make, lang, opts) {
  try { return new make(lang || undefined, opts); } catch { return new make(undefined, opts); }
}

export class StreamdFeed extends HTMLElement {
  static observedAttributes = ['feed', 'limit', 'theme', 'height', 'mode', 'token', 'lang'];
  static deadline = 35000; // ms without a frame: the socket is dead (the server sends a heartbeat after 25 s of quiet)
  static backoff = [500, 30000]; // full jitter: random(0, min(cap, base * 2^tries))

  constructor() {
    super();
    this._nodes = new Map(); // post id -> article in the list
    this._queue = new Map(); // post id -> post, held back while scrolled or paused
    this._gone = new Set(); // ids deleted, so that a replay cannot bring them back
    this._gen = 0;
    this._tries = 0;
    this._revealing = 0;
    this._state = 'idle';
    const root = this.attachShadow({ mode: 'open' });
    this._own = new CSSStyleSheet();
    root.adoptedStyleSheets = [sheet, this._own];
    this._label = h('span', {});
    this._st = h('span', { class: 'st', part: 'state' });
    this._pause = h('button', { type: 'button', part: 'pause-button' }, 'Pause');
    this._new = h('button', { type: 'button', class: 'n', part: 'new-posts', hidden: '' });
    this._list = h('div', { part: 'feed', role: 'feed', 'aria-busy': 'true' });
    this._spacer = h('div', { class: 'sp', 'aria-hidden': 'true', hidden: '' });
    this._scroller = h('div', { class: 'l', part: 'scroller' }, this._list, this._spacer);
    this._empty = h('p', { class: 'e', part: 'empty' }, 'Loading…');
    this._sr = h('div', { class: 'sr', role: 'status' });
    this._root = h('div', { class: 'r', part: 'root' },
      h('header', { part: 'header' }, h('span', { class: 'dot', 'aria-hidden': 'true' }),
        h('span', { class: 'ti', part: 'title' }, h('slot', {}, this._label)), this._st, this._pause),
      h('div', { class: 'b' }, this._empty, this._scroller, this._new), this._sr);
    root.append(this._root);
    this._pause.onclick = () => this._setPaused(!this._paused);
    this._new.onclick = () => this._flush(true);
    // The reader taking over the scroll ends a reveal: what arrives next waits behind the button.
    for (const t of ['wheel', 'touchstart', 'keydown']) this._scroller.addEventListener(t, () => { this._revealing = 0; }, { passive: true });
    this._wake = (e) => this._onWake(e);
  }

  connectedCallback() {
    this._on = true;
    this._apply();
    track(this, true);
    for (const t of ['online', 'pageshow']) addEventListener(t, this._wake);
    document.addEventListener('visibilitychange', this._wake);
    // Lazy: the socket opens when the element nears the viewport.
    this._io = new IntersectionObserver((es) => {
      if (es.some((e) => e.isIntersecting)) { this._io.disconnect(); this._near = true; this._start(); }
    }, { rootMargin: '800px' });
    this._io.observe(this);
  }

  disconnectedCallback() {
    this._on = this._near = false;
    track(this, false);
    for (const t of ['online', 'pageshow']) removeEventListener(t, this._wake);
    document.removeEventListener('visibilitychange', this._wake);
    this._io.disconnect();
    this._stop();
    this._started = false;
  }

  attributeChangedCallback(name, old, value) {
    if (!this._on || old === value) return;
    if (name === 'feed' || name === 'token' || name === 'limit') this._reset();
    else this._apply();
  }

  /** The attribute, else `<meta name="streamd:NAME">`, else the default. */
  _opt(name) {
    return this.getAttribute(name) ?? document.querySelector(`meta[name="streamd:${name}"]`)?.content ?? DEFAULTS[name] ?? null;
  }

  _apply() {
    const theme = this._opt('theme');
    this._root.className = 'r ' + (theme === 'dark' ? 'd' : theme === 'light' ? 'l' : 'a') + (this._state === 'live' ? ' on' : '');
    let height = (this._opt('height') || '').trim();
    if (/^\d+(\.\d+)?$/.test(height)) height += 'px';
    if (!/^\d+(\.\d+)?(px|em|rem|vh|svh|dvh|%)$/.test(height)) height = DEFAULTS.height;
    this._own.replaceSync(`:host{--_h:${height}}`);
    const lang = this._opt('lang') || document.documentElement.lang || '';
    lang ? this._root.setAttribute('lang', lang) : this._root.removeAttribute('lang');
    this._rtf = intl(Intl.RelativeTimeFormat, lang, { numeric: 'auto', style: 'short' });
    this._dtf = intl(Intl.DateTimeFormat, lang, { dateStyle: 'medium', timeStyle: 'short' });
    this._limit = Math.min(100, Math.max(1, parseInt(this._opt('limit'), 10) || 20));
    this._feed = this._opt('feed');
    this._label.textContent = this._feed || '';
    this._list.setAttribute('aria-label', (this.textContent.trim() || this._feed || 'streamd') + ': live posts');
    const paused = this._opt('mode') === 'paused';
    if (paused !== !!this._paused) this._setPaused(paused);
    this._tick(true);
  }

  // -- connection ---------------------------------------------------------------------

  _start() {
    if (this._started || !this._near) return;
    this._started = true;
    if (!this._feed) return this._fail('No feed given');
    this._connect();
  }

  _stop() {
    this._gen++;
    clearTimeout(this._retry);
    this._unsync();
    const ws = this._ws;
    this._ws = null;
    if (ws) { ws.onclose = ws.onmessage = ws.onopen = null; ws.close(1000); }
  }

  _reset() {
    this._stop();
    this._nodes.clear(); this._queue.clear(); this._gone.clear();
    this._list.replaceChildren();
    this._cursor = this._loaded = this._first = this._dead = this._started = false;
    this._banner();
    this._apply();
    this._start();
  }

  _connect() {
    clearTimeout(this._retry);
    if (!this._started || this._dead || this._ws) return;
    const gen = ++this._gen;
    this._status(this._tries ? 'reconnecting' : 'connecting');
    // The history is fetched while the socket opens; the subscription resumes after it.
    if (!this._loaded && !this._first) {
      const first = (this._first = this._fetch());
      first.catch(() => { if (this._first === first) this._first = null; }); // awaited on open, or refetched
    }
    const ws = (this._ws = new WebSocket(WS));
    this._seen = Date.now();
    this._due = Infinity;
    ws.onmessage = (e) => { this._seen = Date.now(); this._due = Infinity; this._frame(JSON.parse(e.data)); };
    ws.onclose = (e) => { if (this._ws === ws) { this._ws = null; this._lost(e.code); } };
    ws.onopen = async () => {
      const token = this._opt('token');
      if (token) this._send({ op: 'auth', token, ref: 'auth' });
      if (!this._loaded) {
        let items;
        try {
          items = await (this._first || this._fetch());
        } catch (err) {
          this._first = null;
          if (gen === this._gen) err.status >= 400 && err.status < 500 && err.status !== 429 ? this._fail(err) : this._drop();
          return;
        }
        if (gen !== this._gen) return;
        this._loaded = true;
        for (const item of items.reverse()) this._post(item.post, true);
        this._cursor = items.length ? items[items.length - 1].cursor : null;
        this._renumber();
      }
      const op = { op: 'subscribe', feed: this._feed, ref: 'sub' };
      this._cursor ? (op.cursor = this._cursor) : (op.backlog = this._limit);
      this._send(op);
    };
  }

  async _fetch() {
    const url = new URL(`/v1/feeds/${encodeURIComponent(this._feed)}/items`, HTTP);
    url.searchParams.set('limit', this._limit);
    const token = this._opt('token');
    if (token) url.searchParams.set('token', token); // a header would need a CORS preflight
    const res = await fetch(url, { credentials: 'omit', cache: 'no-store' });
    if (!res.ok) throw Object.assign(new Error(`history: HTTP ${res.status}`), { status: res.status });
    return (await res.json()).items;
  }

  _send(msg) {
    if (this._ws?.readyState === 1) this._ws.send(JSON.stringify(msg));
  }

  /** Give up on the current socket (dead, or useless) and reconnect with backoff. */
  _drop() {
    const ws = this._ws;
    if (ws) { this._ws = null; ws.onclose = ws.onmessage = ws.onopen = null; ws.close(); }
    this._lost(1006);
  }

  _lost(code) {
    this._gen++;
    this._unsync();
    if (!this._started || this._dead) return;
    if (code === 4001) return this._fail('The embed token has expired');
    const [base, cap] = StreamdFeed.backoff;
    const delay = Math.random() * Math.min(cap, base * 2 ** this._tries++);
    this._status(navigator.onLine === false ? 'offline' : 'reconnecting');
    clearTimeout(this._retry);
    this._retry = setTimeout(() => this._connect(), delay);
  }

  _onWake(e) {
    if ((e.type === 'visibilitychange' && document.hidden) || !this._started || this._dead) return;
    if (!this._ws) { this._tries = 0; this._connect(); return; } // waiting out a backoff: go now
    if (this._ws.readyState === 1) { // it may have died silently in sleep: it has a few seconds to answer
      this._send({ op: 'ping', ref: 'wake' });
      this._due = Math.min(this._due, Date.now() + 5000);
    }
  }

  _tick(times) {
    const now = Date.now();
    if (this._ws && (now - this._seen > StreamdFeed.deadline || now > this._due)) this._drop();
    if (times) for (const t of this._list.querySelectorAll('time')) {
      const text = ago(t.ms, this._rtf);
      if (t.textContent !== text) t.textContent = text;
    }
  }

  _frame(m) {
    if (m.op === 'post' || m.op === 'delete') {
      if (m.feed !== this._feed) return;
      this._cursor = m.cursor;
      if (this._sync) this._sync.push(m);
      else m.op === 'post' ? this._post(m.post) : this._delete(m.post_id);
    } else if (m.op === 'subscribed') {
      this._tries = 0;
      this._status('live');
      if (m.gap) this._resync();
    } else if (m.op === 'error') {
      if (m.ref === 'auth' || m.code === 'unauthorized') this._fail('The embed token is not valid');
      else if (m.code === 'not_found') this._fail('This feed is not available');
      else if (m.ref === 'sub' && m.code === 'bad_request') { this._cursor = null; this._loaded = false; this._resync(true); }
      else if (m.ref === 'sub') this._drop();
    }
  }

  /** After a gap: the HTTP history is the truth; keep what is newer, drop what is gone. */
  async _resync(reload) {
    const gen = this._gen;
    this._sync = [];
    this._from = this._cursor;
    let items;
    try {
      if (reload) this._send({ op: 'subscribe', feed: this._feed, ref: 'resub' });
      items = await this._fetch();
    } catch {
      if (gen === this._gen) this._drop();
      return;
    }
    if (gen !== this._gen) return;
    this._loaded = true;
    const keep = new Set(items.map((i) => i.post.id));
    const head = items[0]?.post.id;
    for (const id of [...this._nodes.keys(), ...this._queue.keys()]) {
      if (!keep.has(id) && !(head && newer(id, head))) this._delete(id, true);
    }
    for (const item of items.reverse()) this._post(item.post, true);
    const held = this._sync;
    this._sync = null;
    for (const m of held) m.op === 'post' ? this._post(m.post) : this._delete(m.post_id);
    this._renumber();
  }

  /** A resync cut short: its held items were never shown, so resume from before them. */
  _unsync() {
    if (this._sync) this._cursor = this._from;
    this._sync = null;
  }

  _fail(why) {
    this._dead = true;
    this._stop();
    this._nodes.clear();
    this._queue.clear();
    this._list.replaceChildren(); // the feed is gone or no longer readable: so are its posts
    this._banner();
    this._status('error', why.status === 404 ? 'This feed is not available' : why.status === 401 ? 'The embed token is not valid' : String(why.message || why));
  }

  _status(state, message) {
    this._state = state;
    this._root.classList.toggle('on', state === 'live');
    const text = this._paused ? 'Paused' : { connecting: 'Connecting…', live: 'Live', reconnecting: 'Reconnecting…', offline: 'Offline' }[state] || '';
    this._st.textContent = state === 'error' ? '' : text;
    if (state === 'error') { this._empty.textContent = message; this._empty.hidden = false; this._list.setAttribute('aria-busy', 'false'); }
    this._emit('status', { state, paused: !!this._paused, pending: this._queue.size, message });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent('streamd:' + type, { detail, bubbles: true, composed: true }));
  }

  // -- posts --------------------------------------------------------------------------

  _post(post, direct) {
    const id = post.id;
    if (this._nodes.has(id) || this._queue.has(id) || this._gone.has(id)) return; // dedupe by id
    const first = this._list.firstElementChild, last = this._list.lastElementChild;
    if (first && !newer(id, first.dataset.id)) {
      // Older than what is shown: only a refill after a gap. Beyond the limit it is not shown.
      if (this._nodes.size >= this._limit && newer(last.dataset.id, id)) return;
      this._insert(post, false);
    } else if (direct) {
      this._insert(post, false);
    } else if (!this._paused && this._atTop()) {
      this._queue.set(id, post);
      this._flush(false);
    } else {
      this._queue.set(id, post);
      while (this._queue.size > this._limit) this._queue.delete(this._queue.keys().next().value);
      this._banner();
    }
    this._emit('post', { post, feed: this._feed });
  }

  _atTop() {
    return this._scroller.scrollTop < 8 || performance.now() < this._revealing;
  }

  /** Show the posts held back at the top; `user`: the reader asked (the "N new posts" button). */
  _flush(user) {
    const hadFocus = this.shadowRoot.activeElement === this._new;
    if (this._queue.size) {
      // Posts in view stay where they are (the scroll offset grows by what went in above
      // them, with a spacer below for room), then the list scrolls up to the new ones:
      // a scroll, not a layout shift, for the reader and for the host page's CLS.
      const s = this._scroller, anchor = this._list.firstElementChild, y = anchor?.offsetTop;
      this._spacer.hidden = false;
      for (const post of this._queue.values()) this._insert(post, true);
      this._queue.clear();
      if (anchor?.isConnected) s.scrollTo({ top: s.scrollTop + anchor.offsetTop - y, behavior: 'instant' });
      this._revealing = performance.now() + 1000; // posts arriving meanwhile still go in at the top
      clearTimeout(this._unspace);
      requestAnimationFrame(() => requestAnimationFrame(() => {
        s.scrollTo({ top: 0 });
        this._unspace = setTimeout(() => { this._spacer.hidden = true; }, 1000);
      }));
    }
    this._banner();
    // The button the reader pressed is gone: keep their focus in the feed, at its top.
    if (user && hadFocus) this._list.firstElementChild?.focus({ preventScroll: true });
  }

  _insert(post, fresh) {
    let ref = this._list.firstElementChild;
    while (ref && !newer(post.id, ref.dataset.id)) ref = ref.nextElementSibling;
    const el = this._article(post);
    if (fresh) el.classList.add('fr');
    this._list.insertBefore(el, ref);
    this._nodes.set(post.id, el);
    const focused = this.shadowRoot.activeElement;
    for (let end = this._list.lastElementChild; this._nodes.size > this._limit && end; ) {
      const prev = end.previousElementSibling;
      if (!end.contains(focused)) { this._nodes.delete(end.dataset.id); end.remove(); }
      end = prev;
    }
    this._renumber();
  }

  _delete(id, silent) {
    if (!silent) {
      this._gone.add(id);
      if (this._gone.size > 1000) this._gone.delete(this._gone.values().next().value);
    }
    if (this._queue.delete(id)) this._banner();
    const el = this._nodes.get(id);
    if (!el) return;
    const next = el.contains(this.shadowRoot.activeElement) && (el.nextElementSibling || el.previousElementSibling);
    this._nodes.delete(id);
    el.remove();
    if (next) next.focus({ preventScroll: true }); // focus was in the post: it stays in the feed
    this._renumber();
  }

  _renumber() {
    let i = 0;
    for (const el of this._list.children) el.setAttribute('aria-posinset', ++i);
    this._list.setAttribute('aria-busy', String(!this._loaded));
    this._empty.textContent = this._loaded ? 'No posts yet' : 'Loading…';
    this._empty.hidden = i > 0;
  }

  _banner() {
    const n = this._queue.size;
    const text = n ? `${n} new post${n > 1 ? 's' : ''}` : '';
    this._new.hidden = !n;
    this._new.textContent = text;
    clearTimeout(this._say);
    this._say = setTimeout(() => { this._sr.textContent = text && (this._paused ? 'Paused: ' : '') + text; }, 400);
  }

  _setPaused(paused) {
    this._paused = paused;
    this._pause.textContent = paused ? 'Resume' : 'Pause';
    if (!paused && this._atTop()) this._flush(false);
    this._status(this._state);
  }

  _article(post) {
    const time = h('time', { part: 'time', datetime: new Date(post.created_at).toISOString(), title: this._dtf.format(post.created_at) }, ago(post.created_at, this._rtf));
    time.ms = post.created_at;
    const el = h('article', { part: 'post', tabindex: '0', 'aria-setsize': '-1', 'data-id': post.id },
      h('div', { class: 'm', part: 'post-header' }, h('span', { class: 'au', part: 'author' }, '@' + post.author), time),
      h('p', { class: 't', part: 'text' }, post.text));
    const media = (post.media || []).filter((m) => /^https:\/\//.test(m.url));
    if (media.length) {
      el.append(h('div', { class: 'md', part: 'media' }, ...media.map((m) => {
        const what = LABELS[m.type] || 'Link', host = new URL(m.url).host;
        const card = h('a', { class: 'c', part: 'media-card', href: m.url, target: '_blank', rel: 'noopener noreferrer nofollow ugc', 'aria-label': `${what} on ${host}` });
        card.append(m.type === 'image'
          ? h('img', { src: m.url, alt: '', loading: 'lazy', decoding: 'async', referrerpolicy: 'no-referrer' })
          : h('span', {}, `${what} · ${host}`));
        return card;
      })));
    }
    return el;
  }
}

if (!customElements.get('streamd-feed')) customElements.define('streamd-feed', StreamdFeed);
