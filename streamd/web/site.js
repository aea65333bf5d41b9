// The snippet builder on the landing page: the form drives the live demo and the embed code.
const form = document.getElementById('builder');
const demo = document.getElementById('demo');
const out = document.getElementById('snippet');
const said = document.getElementById('copied');
const FEED = /^(user:[a-z0-9_]{1,32}|list:[A-Za-z0-9_-]{1,32}|event:[a-z0-9][a-z0-9-]{0,63})$/;
const esc = (s) => s.replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/</g, '&lt;');

const wanted = new URLSearchParams(location.search).get('feed');
if (wanted && FEED.test(wanted)) form.feed.value = wanted;

function update() {
  const f = form.elements;
  const feed = f.feed.value.trim();
  const ok = FEED.test(feed);
  f.feed.setCustomValidity(ok ? '' : 'user:<handle>, list:<id> or event:<slug>');
  const attrs = { feed, limit: f.limit.value, theme: f.theme.value, height: f.height.value };
  if (f.mode.value !== 'auto') attrs.mode = f.mode.value;
  if (f.token.value.trim()) attrs.token = f.token.value.trim();
  const base = location.origin;
  out.value = `<script type="module" src="${base}/embed.js" async></script>\n` +
    `<streamd-feed ${Object.entries(attrs).map(([k, v]) => `${k}="${esc(v)}"`).join(' ')}>\n` +
    `  <a href="${base}/watch/${esc(feed)}">Live: ${esc(feed)}</a>\n</streamd-feed>\n` +
    `<!-- no layout shift while it loads: in your stylesheet -->\n` +
    `<!-- streamd-feed { display: block; height: ${attrs.height}px } -->`;
  if (!ok) return;
  demo.textContent = feed;
  for (const [k, v] of Object.entries(attrs)) if (demo.getAttribute(k) !== v) demo.setAttribute(k, v);
  for (const k of ['mode', 'token']) if (!(k in attrs)) demo.removeAttribute(k);
}

form.addEventListener('input', update);
form.addEventListener('submit', (e) => e.preventDefault());
document.getElementById('copy').addEventListener('click', async () => {
  try {
    await navigator.clipboard.writeText(out.value);
  } catch {
    out.select();
    document.execCommand('copy');
  }
  said.textContent = 'Copied';
  setTimeout(() => { said.textContent = ''; }, 2000);
});
update();
