// The Explore page's map: every point of a run in WebGL (regl-scatterplot), hover for the image,
// click for one point, box or lasso for a region. A Streamlit component (protocol v1, spoken by
// hand: four postMessage types). The point data never travels in the component's arguments: the
// arguments carry URLs of small binary files that Streamlit serves statically, fetched once and
// kept by URL, so a rerun costs a few hundred bytes.
//
// With `frames` (the map across epochs: one coordinates file per epoch, same points in the same
// order) a scrubber and a play button switch frames here in the browser, with regl-scatterplot's
// animated transition, so playing never reruns the page's script.
import createScatterplot from 'regl-scatterplot';

const send = (type, data) => window.parent.postMessage({ isStreamlitMessage: true, type, ...data }, '*');
const setValue = (value) => send('streamlit:setComponentValue', { value, dataType: 'json' });
const setHeight = () => send('streamlit:setFrameHeight', { height: document.getElementById('root').scrollHeight + 4 });

const canvas = document.getElementById('canvas');
const frame = document.getElementById('frame');
const statusBox = document.getElementById('status');
const tip = document.getElementById('tip');
const legendBox = document.getElementById('legend');
const hint = document.getElementById('hint');
const framesBox = document.getElementById('frames');
const playButton = document.getElementById('play');
const scrub = document.getElementById('scrub');
const frameLabel = document.getElementById('frame-label');

// the iframe lives at <base>/component/<name>/index.html; static files at <base>/app/static/...
const resolve = (path) => new URL(`../../${path}`, window.location.href).toString();
const fetched = new Map();
const fetchArray = (path, Type) => {
  if (!fetched.has(path)) {
    fetched.set(path, fetch(resolve(path)).then((response) => {
      if (response.status === 404) {
        throw new Error(`${path} was not found. Is Streamlit's static file serving on? Start the app from its `
          + 'own folder, where .streamlit/config.toml switches it on, or pass --server.enableStaticServing true');
      }
      if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
      return response.arrayBuffer();
    }).then((buffer) => new Type(buffer)).catch((error) => { fetched.delete(path); throw error; }));
  }
  return fetched.get(path);
};

let plot = null;
let args = null;
let drawn = { points: null, colour: null };
let labels = null;
let colours = null;
let mode = 'pan';
let lassoing = false;
let drawing = Promise.resolve();
let lastPointer = { x: 0, y: 0 };
let renderStarted = 0;
let pointSizePx = 4;
let positions = null;  // the dataset image of each point, when the points are a subset
let frameIndex = null;  // the frame shown, with `frames`
let playing = false;
let hidden = new Set();  // legend entries (colour categories) the person hid by clicking them
let hiddenFor = null;  // the legend those entries belong to (names joined): another legend shows everything
let shownInitialFrame = null;  // the `frame` argument already applied (a link's epoch)
let fitted = null;  // what the view was fitted to: {key, box} (fitView)
let viewMoved = false;  // the person panned or zoomed since (a resize then keeps their view)
let press = null;  // the mouse press on the map in progress: {x, y, dragged}
const TRANSITION_MS = 700;
const PAUSE_MS = 350;
// read by the browser tests and bench
window.__map = { linkedHover: null, ready: false, firstPaintMs: null, points: 0, frame: null, frames: 0, playing: false, hidden: [] };
const FOCUS_CONTEXT = 150;  // "Show on map" frames the point among this many of its map neighbours
const CLICK_SLOP = 3;  // px a press may move and still be a click (see the mousedown listener)
const FIT_MARGIN = 14;  // px left around a map's points, beyond their radius (fitView)

// Each tool's hint is in index.html, all in one grid cell and only the tool's own visible, so the
// toolbar is as tall whichever tool is picked (a shorter hint fitted beside the buttons where the
// pan hint wrapped below them, and the map jumped ~20 px when a tool was picked).
function setMode(next) {
  mode = next;
  document.querySelectorAll('#toolbar button[data-mode]').forEach((b) => b.classList.toggle('active', b.dataset.mode === mode));
  hint.querySelectorAll('[data-hint]').forEach((h) => h.classList.toggle('active', h.dataset.hint === mode));
  if (!plot) return;
  plot.set({
    mouseMode: mode === 'pan' ? 'panZoom' : 'lasso',
    lassoType: mode === 'box' ? 'rectangle' : 'freeform',
  });
}

function makePlot(height) {
  const width = frame.clientWidth || 600;
  canvas.style.height = `${height}px`;
  plot = createScatterplot({
    canvas, width, height,
    backgroundColor: [0.98, 0.98, 0.99, 1],
    pointSize: 4,
    pointSizeSelected: 1,
    pointOutlineWidth: 1,
    pointColorHover: [0.1, 0.1, 0.1, 1],
    pointColorActive: [0.11, 0.43, 0.82, 1],
    opacityInactiveMax: 0.2,
    // a selected point keeps its own colour (its category's, opaque), however it was selected.
    // regl-scatterplot settles that when it builds its colour texture, on setting pointColor, by
    // colorBy: set only after the first draw, it left a map's first colours drawing every selection
    // (clicked, lassoed, restored from the link) flat blue until another colouring rebuilt it
    colorBy: 'valueA',
    lassoColor: [0.11, 0.43, 0.82, 1],
    // every pointer movement extends the lasso: with a delay, the movements of a quick small
    // lasso were dropped (and its last one always), leaving too few corners to enclose anything
    lassoMinDelay: 0,
    lassoMinDist: CLICK_SLOP,  // a release this far from the press is no click (to regl-scatterplot too)
    deselectOnDblClick: true,
  });
  plot.subscribe('pointOver', (i) => { showTip(i); tellLinked(i); });
  plot.subscribe('pointOut', () => { tip.style.display = 'none'; tellLinked(null); });
  // regl-scatterplot publishes `select` before `lassoEnd`: a lasso is known from its start
  plot.subscribe('lassoStart', () => { lassoing = true; });
  plot.subscribe('lassoEnd', () => { lassoing = false; });  // (a lasso around nothing selects nothing)
  plot.subscribe('select', ({ points: all }) => {
    const points = Array.from(all).filter((i) => i < args.n);  // marks are not the map's images
    if (!points.length) { lassoing = false; return; }
    const region = lassoing || points.length > 1;
    lassoing = false;
    setValue(region ? { type: 'region', points: Array.from(points), nonce: Date.now() }
      : { type: 'click', point: points[0], nonce: Date.now() });
    if (region && mode !== 'pan') setMode('pan');
  });
  plot.subscribe('deselect', () => setValue({ type: 'clear', nonce: Date.now() }));
  canvas.addEventListener('pointermove', (event) => {
    const box = frame.getBoundingClientRect();
    lastPointer = { x: event.clientX - box.left, y: event.clientY - box.top };
    if (tip.style.display === 'block') placeTip();
  });
  canvas.addEventListener('pointerleave', () => { tip.style.display = 'none'; });
  new ResizeObserver(() => {
    if (!plot || !frame.clientWidth) return;
    // (the map's shape is taken on the next frame); a view still as fitted is fitted again to
    // the new shape (a scroll bar appeared, the window narrowed)
    plot.set({ width: frame.clientWidth }).then(() => { if (fitted && !viewMoved) fitView(fitted); });
  }).observe(frame);
  canvas.addEventListener('wheel', () => { viewMoved = true; }, { passive: true });
  window.__map.getScreenPosition = (i) => plot.getScreenPosition(i);
  window.__map.selected = () => plot.get('selectedPoints');
}

// A press on the map is a click only while the pointer stays within CLICK_SLOP of where it went
// down; further, it is a drag (pan, box or lasso). regl-scatterplot starts a lasso on the first
// movement and takes any release within lassoMinDist of the press for a click, so a small lasso,
// closed where it began, selected its region and then the point under its end (and a click's
// wobble in the lasso tools lassoed nothing, clearing the selection). So movements inside the slop
// never reach it (its lasso and its pan start past the slop), and a drag's click never does.
window.addEventListener('mousedown', (event) => {
  press = event.target === canvas && event.button === 0 ? { x: event.clientX, y: event.clientY, dragged: false } : null;
}, true);
window.addEventListener('mousemove', (event) => {
  if (!press || press.dragged || !(event.buttons & 1)) return;
  if (Math.hypot(event.clientX - press.x, event.clientY - press.y) < CLICK_SLOP) {
    event.stopPropagation();
  } else {
    press.dragged = true;
    if (mode === 'pan' && !event.shiftKey) viewMoved = true;
  }
}, true);
const dropDragClick = (event) => { if (press && press.dragged && event.target === canvas) event.stopPropagation(); };
window.addEventListener('click', dropDragClick, true);
window.addEventListener('dblclick', dropDragClick, true);

// The view that shows every point: the points' box, with FIT_MARGIN pixels to spare on the side that
// binds, whatever the map's shape (regl-scatterplot's own view spans -1..1 vertically, so a map
// narrower than tall cut off the points at its left and right edges).
function boxOf(xy, extra = []) {
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  const take = (x, y) => {
    if (!Number.isFinite(x) || !Number.isFinite(y)) return;
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  };
  for (let i = 0; i < xy.length; i += 2) take(xy[i], xy[i + 1]);
  extra.forEach((m) => take(m.x, m.y));
  return x0 <= x1 ? { x0, y0, x1, y1 } : { x0: -1, y0: -1, x1: 1, y1: 1 };
}
function fitView(fit) {
  fitted = fit;
  viewMoved = false;
  const { box } = fit;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  const margin = FIT_MARGIN + pointSizePx;
  const across = Math.max(box.x1 - box.x0, 1e-3);
  const tall = Math.max(box.y1 - box.y0, 1e-3);
  // the box grown so that `margin` pixels of the canvas are left on each side
  const w = across * (width / Math.max(width - 2 * margin, 1));
  const h = tall * (height / Math.max(height - 2 * margin, 1));
  const cx = (box.x0 + box.x1) / 2;
  const cy = (box.y0 + box.y1) / 2;
  plot.zoomToArea({ x: cx - w / 2, y: cy - h / 2, width: w, height: h }, { transition: false });
}

// Linked maps (`link`: {group, url}): two maps of one group, two iframes of one origin, show each
// other's hovered image. A hovered point goes out on a BroadcastChannel as its shared-image index
// (`url`: a uint32 file, point → shared index, 0xFFFFFFFF for none; without it the point itself).
let channel = null;
let linkGroup = null;
let toShared = null;
let fromShared = null;
const UNSHARED = 0xFFFFFFFF;
function setupLink() {
  const link = args.link || null;
  if (!link || link.group !== linkGroup) {
    if (channel) channel.close();
    channel = null;
    linkGroup = link ? link.group : null;
    if (link) {
      channel = new BroadcastChannel(`embedding-map-${link.group}`);
      channel.onmessage = (event) => showLinked(event.data.shared);
    }
  }
  if (link && link.url) {
    fetchArray(link.url, Uint32Array).then((array) => {
      toShared = array;
      fromShared = new Map();
      array.forEach((s, i) => { if (s !== UNSHARED) fromShared.set(s, i); });
    });
  } else {
    toShared = fromShared = null;
  }
}
function tellLinked(i) {
  if (!channel) return;
  if (i !== null && i >= args.n) i = null;  // a mark (a searched image) is no shared image
  const shared = i === null ? null : (toShared ? toShared[i] : i);
  channel.postMessage({ shared: shared === UNSHARED ? null : shared });
}
function showLinked(shared) {
  if (!plot || !window.__map.ready) return;
  const i = shared === null ? undefined : (fromShared ? fromShared.get(shared) : shared);
  window.__map.linkedHover = i === undefined ? null : i;
  if (i === undefined) {
    plot.hover(-1, { preventEvent: true });
    tip.style.display = 'none';
    return;
  }
  plot.hover(i, { showReticleOnce: true, preventEvent: true });
  const [x, y] = plot.getScreenPosition(i);
  lastPointer = { x, y };
  showTip(i);
}

function placeTip() {
  const width = frame.clientWidth;
  const left = lastPointer.x + 16 + 200 > width ? lastPointer.x - 16 - tip.offsetWidth : lastPointer.x + 16;
  tip.style.left = `${Math.max(0, left)}px`;
  tip.style.top = `${Math.max(0, Math.min(lastPointer.y + 12, frame.clientHeight - tip.offsetHeight))}px`;
}

function showTip(i) {
  if (!args) return;
  if (i >= args.n) {  // a mark
    const mark = marks()[i - args.n];
    tip.querySelector('.thumb').style.display = 'none';
    tip.querySelector('.text').innerHTML = mark ? `searched: <b>${escape(mark.name)}</b>` : '';
    tip.style.display = 'block';
    placeTip();
    return;
  }
  const thumb = tip.querySelector('.thumb');
  const t = args.thumbs;
  const image = positions ? positions[i] : i;
  if (t) {
    const sheet = Math.floor(image / t.per_sheet);
    const cell = image % t.per_sheet;
    const scale = 112 / t.cell;
    thumb.style.display = 'block';
    thumb.style.backgroundImage = `url("${resolve(`${t.base}sheet-${sheet}.png`)}")`;
    thumb.style.backgroundSize = `${t.cols * t.cell * scale}px auto`;
    thumb.style.backgroundPosition = `-${(cell % t.cols) * t.cell * scale}px -${Math.floor(cell / t.cols) * t.cell * scale}px`;
  } else {
    thumb.style.display = 'none';
  }
  const label = labels && labels[i] !== 65535 ? args.classes[labels[i]] : 'unlabeled';
  const colourName = colours && args.legend[colours[i]] ? args.legend[colours[i]].name : '';
  const extra = args.colour_title && args.colour_title !== 'label' && colourName ? `<br>${args.colour_title}: ${escape(colourName)}` : '';
  tip.querySelector('.text').innerHTML = `#${image} · <b>${escape(label)}</b>${extra}`;
  tip.style.display = 'block';
  placeTip();
}

const escape = (text) => String(text).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));

// The legend: a click on an entry hides its points (and shows them again); hidden entries are
// kept while the legend stays the same (another colouring shows every point again).
function drawLegend() {
  const names = args.legend.map((entry) => entry.name).join('\u0001');
  if (names !== hiddenFor) { hidden = new Set(); hiddenFor = names; }
  legendBox.innerHTML = args.legend.map((entry, i) => (entry.count
    ? `<button class="entry${hidden.has(i) ? ' hidden' : ''}" data-entry="${i}" title="Click to ${hidden.has(i) ? 'show' : 'hide'} these points">`
      + `<span class="swatch" style="background:${entry.colour}"></span>${escape(entry.name)} `
      + `<span class="count">${entry.count.toLocaleString()}</span></button>`
    : '')).join('')
    + (marks().length && !frames() ? `<span><span class="swatch" style="background:${MARK_COLOUR}"></span>searched `
      + `<span class="count">${marks().length}</span></span>` : '')
    + '<span class="legend-hint">click an entry to hide or show it</span>';
  legendBox.querySelectorAll('button.entry').forEach((button) => button.addEventListener('click', () => {
    const i = Number(button.dataset.entry);
    if (hidden.has(i)) hidden.delete(i); else hidden.add(i);
    drawLegend();
    applyHidden();
  }));
  window.__map.hidden = Array.from(hidden).map((i) => args.legend[i].name);
}

function applyHidden() {
  if (!plot || !colours) return;
  if (!hidden.size) { plot.unfilter({ preventEvent: true }); return; }
  const visible = [];
  for (let i = 0; i < colours.length; i += 1) if (!hidden.has(colours[i])) visible.push(i);
  if (!frames()) marks().forEach((_, j) => visible.push(colours.length + j));
  plot.filter(visible, { preventEvent: true });
}

// Legend entries marked `background` (points that are not part of the colouring's question, such
// as "not a query" under average precision) are drawn faint and underneath the others.
const rgba = (hex, alpha) => {
  const v = parseInt(hex.replace('#', ''), 16);
  return [((v >> 16) & 255) / 255, ((v >> 8) & 255) / 255, (v & 255) / 255, alpha];
};

function drawOrder() {
  const back = new Set(args.legend.map((entry, i) => (entry.background ? i : -1)).filter((i) => i >= 0));
  const marked = frames() ? 0 : marks().length;
  if (!back.size && !marked) return null;
  const under = [];
  const over = [];
  for (let i = 0; i < colours.length; i += 1) (back.has(colours[i]) ? under : over).push(i);
  for (let i = 0; i < marked; i += 1) over.push(colours.length + i);
  return under.concat(over);
}

// The `count` points nearest point i in the map's own coordinates (i included).
function mapNeighbours(xy, i, count) {
  const x = xy[2 * i];
  const y = xy[2 * i + 1];
  const n = xy.length / 2;
  if (n <= count) return Array.from({ length: n }, (_, j) => j);
  const d = new Float32Array(n);
  for (let j = 0; j < n; j += 1) d[j] = (xy[2 * j] - x) ** 2 + (xy[2 * j + 1] - y) ** 2;
  const limit = Float32Array.from(d).sort()[count - 1];
  const near = [];
  for (let j = 0; j < n && near.length < count; j += 1) if (d[j] <= limit) near.push(j);
  return near;
}

// ------------------------------------------------------------------ frames (epochs)

const frames = () => (args && Array.isArray(args.frames) && args.frames.length ? args.frames : null);
const pointsUrl = () => (frames() ? frames()[frameIndex].url : args.points_url);
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

function setupFrames() {
  const list = frames();
  framesBox.style.display = list ? 'flex' : 'none';
  if (!list) { frameIndex = null; return; }
  if (frameIndex === null || frameIndex >= list.length) frameIndex = list.length - 1;  // opens on the last epoch
  if (args.frame !== undefined && args.frame !== null && args.frame !== shownInitialFrame) {  // a link's epoch
    shownInitialFrame = args.frame;
    const at = list.findIndex((f) => String(f.epoch) === String(args.frame));
    if (at >= 0) frameIndex = at;
  }
  scrub.max = String(list.length - 1);
  scrub.disabled = list.length < 2;
  playButton.disabled = list.length < 2;
  labelFrame();
}

function labelFrame() {
  const list = frames();
  const f = list[frameIndex];
  scrub.value = String(frameIndex);
  const p1 = typeof f.precision_at_1 === 'number' ? ` · Precision@1 <b>${f.precision_at_1.toFixed(3)}</b>` : '';
  frameLabel.innerHTML = `Epoch <b>${escape(f.epoch)}</b> of ${escape(list[list.length - 1].epoch)}${p1}`;
  window.__map.frame = frameIndex;
  window.__map.frames = list.length;
}

// marks: images that are not the map's own points (a search's uploads), placed by the page and
// drawn after the n points in a colour of their own, on top of everything
const marks = () => (args && Array.isArray(args.marks) ? args.marks : []);
const MARK_COLOUR = '#111111';

function rowsOf(xy) {
  const rows = new Array(args.n);
  for (let i = 0; i < args.n; i += 1) rows[i] = [xy[2 * i], xy[2 * i + 1], colours[i]];
  if (!frames()) marks().forEach((m) => rows.push([m.x, m.y, args.legend.length]));
  return rows;
}

// Move every point to frame i's coordinates; only the newest request is drawn (a fast scrub
// skips the frames in between), one draw at a time.
async function showFrame(i) {
  const list = frames();
  if (!list || !plot || !colours) return;
  frameIndex = Math.max(0, Math.min(list.length - 1, i));
  labelFrame();
  const wanted = frameIndex;
  const url = list[wanted].url;
  try {
    const xy = await fetchArray(url, Float32Array);
    drawing = drawing.then(async () => {
      if (frameIndex !== wanted || drawn.points === url || xy.length !== 2 * args.n) return;
      const selected = Array.from(plot.get('selectedPoints'));
      await plot.draw(rowsOf(xy), { transition: true, transitionDuration: TRANSITION_MS, zDataType: 'categorical' });
      if (selected.length) plot.select(selected, { preventEvent: true });
      drawn.points = url;
    });
    await drawing;
  } catch (error) {
    statusBox.textContent = `The frame could not load: ${error.message}`;
  }
}

function setPlaying(on) {
  playing = on;
  window.__map.playing = on;
  playButton.textContent = on ? '❚❚ Pause' : '▶ Play';
}

async function play() {
  const list = frames();
  if (!list) return;
  setPlaying(true);
  if (frameIndex >= list.length - 1) {  // from the start again
    await showFrame(0);
    await sleep(PAUSE_MS);
  }
  while (playing && frameIndex < list.length - 1) {
    await showFrame(frameIndex + 1);
    await sleep(PAUSE_MS);
  }
  setPlaying(false);
}

// the epoch shown goes to the page (for its link) when the person settles on one, not on every frame
const reportFrame = () => {
  const list = frames();
  if (list && frameIndex !== null) setValue({ type: 'frame', epoch: list[frameIndex].epoch, nonce: Date.now() });
};
playButton.addEventListener('click', async () => {
  if (playing) { setPlaying(false); return; }
  await play();
  reportFrame();
});
scrub.addEventListener('input', () => { setPlaying(false); showFrame(Number(scrub.value)); });
scrub.addEventListener('change', reportFrame);
window.__map.showFrame = showFrame;

// ------------------------------------------------------------------ render

async function render(newArgs) {
  const first = !plot;
  args = newArgs;
  if (first) {
    renderStarted = performance.now();
    makePlot(args.height || 560);
    setMode('pan');
  }
  setupFrames();
  setupLink();
  drawLegend();
  setHeight();
  try {
    const wantedPoints = pointsUrl();
    const [xy, labelArray, colourArray, positionArray] = await Promise.all([
      fetchArray(wantedPoints, Float32Array), fetchArray(args.labels_url, Uint16Array), fetchArray(args.colour_url, Uint8Array),
      args.positions_url ? fetchArray(args.positions_url, Uint32Array) : Promise.resolve(null),
    ]);
    if (args !== newArgs) return;  // a newer render arrived meanwhile
    labels = labelArray;
    colours = colourArray;
    positions = positionArray;
    const n = args.n;
    if (xy.length !== 2 * n || labelArray.length !== n || colourArray.length !== n || (positions && positions.length !== n)) {
      throw new Error(`the map's files hold ${xy.length / 2} points, ${labelArray.length} labels and ${colourArray.length} colours; expected ${n}`);
    }
    const faint = n > 20000 ? 0.18 : 0.3;
    pointSizePx = n > 200000 ? 2 : n > 20000 ? 3 : n > 2000 ? 4 : 6;
    plot.set({
      pointColor: args.legend.map((entry) => rgba(entry.colour, entry.background ? faint : 1)).concat([rgba(MARK_COLOUR, 1)]),
      pointSize: pointSizePx,
      opacity: n > 20000 ? 0.75 : 0.9,
    });
    // one draw at a time: a render that arrives meanwhile waits, then draws only if still newest
    drawing = drawing.then(async () => {
      if (args !== newArgs) return;
      const wantedMarks = JSON.stringify(marks());
      if (drawn.points !== wantedPoints || drawn.colour !== newArgs.colour_url || drawn.marks !== wantedMarks) {
        const keep = drawn.points === wantedPoints && drawn.marks === wantedMarks ? plot.get('spatialIndex') : undefined;
        await plot.draw(rowsOf(xy), { zDataType: 'categorical', spatialIndex: keep, select: newArgs.selected || [] });
        plot.set({ pointOrder: drawOrder() });
        // a new map opens on all of its points (a new colouring or search keeps the view); the
        // frames across epochs share one box, [-0.95, 0.95] (core.explore.map_files.write_frames),
        // so that every epoch stays in view
        const fitKey = frames() ? 'frames' : wantedPoints;
        if (!fitted || fitted.key !== fitKey) {
          fitView({ key: fitKey, box: frames() ? { x0: -0.95, y0: -0.95, x1: 0.95, y1: 0.95 } : boxOf(xy, marks()) });
        }
        drawn = { points: wantedPoints, colour: newArgs.colour_url, marks: wantedMarks };
        window.__map.marks = marks().length;
        applyHidden();
      } else {
        const want = (newArgs.selected || []).join(',');
        if (Array.from(plot.get('selectedPoints')).join(',') !== want) {
          plot.select(newArgs.selected || [], { preventEvent: true });  // the page's selection, kept
        }
      }
      const focus = newArgs.focus;
      if (focus && focus.nonce !== window.__map.focusNonce) {
        window.__map.focusNonce = focus.nonce;
        plot.select([focus.point], { preventEvent: true });
        // the point among its nearest map neighbours, not the point alone (that zoomed so deep the
        // context was lost)
        plot.zoomToPoints(mapNeighbours(xy, focus.point, FOCUS_CONTEXT), { padding: 40, transition: true });
        viewMoved = true;
      }
    });
    await drawing;
    if (args !== newArgs) return;
    statusBox.textContent = '';
    if (!window.__map.ready) {
      window.__map.firstPaintMs = performance.now() - renderStarted;
      window.__map.ready = true;
    }
    window.__map.points = n;
    document.body.dataset.ready = 'yes';
  } catch (error) {
    statusBox.textContent = `The map could not load: ${error.message}`;
    document.body.dataset.ready = 'error';
  }
}

document.querySelectorAll('#toolbar button[data-mode]').forEach((b) => b.addEventListener('click', () => setMode(b.dataset.mode)));
document.getElementById('reset').addEventListener('click', () => { if (plot && fitted) fitView(fitted); });
document.getElementById('clear').addEventListener('click', () => {
  if (plot) plot.deselect({ preventEvent: true });
  setValue({ type: 'clear', nonce: Date.now() });  // even when the map had nothing selected
});
window.addEventListener('message', (event) => {
  if (event.data && event.data.type === 'streamlit:render') render(event.data.args);
});
send('streamlit:componentReady', { apiVersion: 1 });
