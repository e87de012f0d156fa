// The page: loads the artifact served under model/, verifies it, and lets a person move
// through the latent space. `window.vae` is what the tests (and a curious console) use.
import {
  IMAGE_SIZE, PIXELS, VAEModel, inkLevels, interpolate, normals, planeBasis, planePoint,
} from './model.mjs';

const STRIP_STEPS = 8;
const TIMINGS_KEPT = 200;
const $ = (id) => document.getElementById(id);

const params = new URLSearchParams(location.search);
let backend = 'wasm';
let backendNote = '';
const state = { model: null, a: null, b: null, basis: null, range: 3, u: 0, v: 0, seed: 1, timings: [] };

function fail(error) {
  console.error(error);
  $('error').hidden = false;
  $('error').textContent = `Error: ${error.message ?? error}`;
  $('status').textContent = 'the model could not be used';
}

async function sha256(bytes) {
  const digest = await crypto.subtle.digest('SHA-256', bytes);
  return Array.from(new Uint8Array(digest), (x) => x.toString(16).padStart(2, '0')).join('');
}

async function readModelFile(name) {
  const response = await fetch(`model/${name}`, { cache: 'no-cache' });
  if (!response.ok) throw new Error(`model/${name}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

/** WebGPU only when asked for (?backend=webgpu) and the browser has an adapter. */
async function chooseBackend() {
  if (params.get('backend') !== 'webgpu') return;
  const adapter = 'gpu' in navigator ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (adapter) backend = 'webgpu';
  else backendNote = 'WebGPU asked for, but this browser has no GPU adapter: ';
}

async function loadRuntime() {
  const ort = await import(backend === 'webgpu' ? './ort/ort.webgpu.min.mjs' : './ort/ort.wasm.min.mjs');
  // Threads need cross-origin isolation (the server's COOP/COEP headers).
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  return ort;
}

/** Decode latents (n x latentDim) and time the call. */
async function decode(latents, n) {
  const started = performance.now();
  const pixels = await state.model.decode(latents, n);
  state.timings.push(performance.now() - started);
  if (state.timings.length > TIMINGS_KEPT) state.timings.shift();
  return pixels;
}

function draw(canvas, pixels, offset = 0) {
  const levels = inkLevels(pixels.subarray(offset, offset + PIXELS));
  const context = canvas.getContext('2d');
  const image = context.createImageData(IMAGE_SIZE, IMAGE_SIZE);
  for (let i = 0; i < PIXELS; i++) {
    image.data.set([levels[i], levels[i], levels[i], 255], 4 * i);
  }
  context.putImageData(image, 0, 0);
}

function median(values) {
  const sorted = [...values].sort((x, y) => x - y);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

function showTiming() {
  if (state.timings.length) {
    $('timing').textContent = `decoding one image: ${median(state.timings).toFixed(2)} ms (median of the last ${state.timings.length})`;
  }
}

let pending = null;
let busy = false;
/** Show a latent; while a decode runs, only the newest request waits (the pointer moves fast). */
async function show(latent) {
  pending = latent;
  if (busy) return;
  busy = true;
  try {
    while (pending) {
      const next = pending;
      pending = null;
      draw($('image'), await decode(next, 1));
    }
  } finally {
    busy = false;
  }
  showTiming();
}

function padToPlane(x, y) {
  const pad = $('pad');
  return [((x / pad.width) * 2 - 1) * state.range, (1 - (y / pad.height) * 2) * state.range];
}

function planeToPad(u, v) {
  const pad = $('pad');
  return [((u / state.range + 1) / 2) * pad.width, ((1 - v / state.range) / 2) * pad.height];
}

function coordinates(latent) {
  const [first, second] = state.basis;
  return [0, 1].map((k) => latent.reduce((sum, x, i) => sum + x * (k ? second : first)[i], 0));
}

function drawPad() {
  const pad = $('pad');
  const context = pad.getContext('2d');
  context.clearRect(0, 0, pad.width, pad.height);
  context.strokeStyle = '#ddd';
  for (const t of [0.25, 0.5, 0.75]) {
    context.beginPath(); context.moveTo(t * pad.width, 0); context.lineTo(t * pad.width, pad.height); context.stroke();
    context.beginPath(); context.moveTo(0, t * pad.height); context.lineTo(pad.width, t * pad.height); context.stroke();
  }
  context.font = 'bold 14px system-ui';
  for (const [name, latent, color] of [['A', state.a, '#1565c0'], ['B', state.b, '#c62828']]) {
    const [x, y] = planeToPad(...coordinates(latent));
    context.fillStyle = color;
    context.beginPath(); context.arc(x, y, 4, 0, 2 * Math.PI); context.fill();
    context.fillText(name, x + 6, y - 6);
  }
  const [x, y] = planeToPad(state.u, state.v);
  context.strokeStyle = '#222';
  context.beginPath(); context.arc(x, y, 7, 0, 2 * Math.PI); context.stroke();
}

/** A new plane through the origin, A and B; the pad spans +-3 (the prior's 3 sigma) or more. */
async function setEnds(a, b) {
  state.a = a;
  state.b = b;
  state.basis = planeBasis(a, b);
  const reach = [a, b].flatMap((latent) => coordinates(latent).map(Math.abs));
  state.range = Math.max(3, 1.15 * Math.max(...reach));
  drawPad();
  const path = await decode(interpolate(a, b, STRIP_STEPS), STRIP_STEPS);
  $('strip').querySelectorAll('canvas').forEach((canvas, s) => draw(canvas, path, s * PIXELS));
}

function prior(seed) {
  return normals(seed, state.model.latentDim);
}

async function encodeFile(file) {
  const bitmap = await createImageBitmap(file);
  const canvas = new OffscreenCanvas(IMAGE_SIZE, IMAGE_SIZE);
  const context = canvas.getContext('2d');
  context.drawImage(bitmap, 0, 0, IMAGE_SIZE, IMAGE_SIZE);
  const { data } = context.getImageData(0, 0, IMAGE_SIZE, IMAGE_SIZE);
  // Fashion-MNIST is light ink on black: a photo on white is inverted to match.
  const grey = Float32Array.from({ length: PIXELS }, (_, i) => (data[4 * i] + data[4 * i + 1] + data[4 * i + 2]) / 765);
  const mean = grey.reduce((sum, x) => sum + x, 0) / PIXELS;
  const pixels = mean > 0.5 ? grey.map((x) => 1 - x) : grey;
  return (await state.model.encode(pixels, 1)).zMean;
}

function showCard(card) {
  const metrics = card.metrics ?? {};
  const rows = [
    ['model', card.name],
    ['latent dimensions', card.latent_dim],
    ['pixel likelihood', (card.likelihood ?? 'bernoulli').replace('_', ' ')],
    ['test negative ELBO', metrics.test_neg_elbo_nats !== undefined ? `${metrics.test_neg_elbo_nats.toFixed(2)} nats` : '—'],
    ['5-NN accuracy of the latents', metrics.knn_accuracy ?? '—'],
    ['classes', (card.class_names ?? []).join(', ')],
    ['ONNX opset', card.opset],
    ['pipeline version', card.versions?.pipeline ?? '—'],
  ];
  $('facts').replaceChildren(...rows.map(([name, value]) => {
    const row = document.createElement('tr');
    const th = document.createElement('th');
    const td = document.createElement('td');
    th.textContent = name;
    td.textContent = String(value);
    row.append(th, td);
    return row;
  }));
}

function wire() {
  const pad = $('pad');
  const move = (event) => {
    if (event.pointerType !== 'mouse' && event.buttons === 0) return;
    const box = pad.getBoundingClientRect();
    [state.u, state.v] = padToPlane(
      ((event.clientX - box.left) / box.width) * pad.width, ((event.clientY - box.top) / box.height) * pad.height);
    $('coords').textContent = `u = ${state.u.toFixed(2)}, v = ${state.v.toFixed(2)}`;
    drawPad();
    show(planePoint(state.basis, state.u, state.v)).catch(fail);
  };
  pad.addEventListener('pointermove', move);
  pad.addEventListener('pointerdown', move);
  $('sample').addEventListener('click', () => {
    state.seed += 1;
    $('seed').textContent = `seed ${state.seed}`;
    show(prior(state.seed)).catch(fail);
  });
  const newEnd = (which) => () => {
    state.seed += 1;
    const latent = prior(state.seed);
    setEnds(which === 'a' ? latent : state.a, which === 'b' ? latent : state.b).catch(fail);
  };
  $('new-a').addEventListener('click', newEnd('a'));
  $('new-b').addEventListener('click', newEnd('b'));
  for (const which of ['a', 'b']) {
    $(`image-${which}`).addEventListener('change', async (event) => {
      const [file] = event.target.files;
      if (!file) return;
      try {
        const latent = await encodeFile(file);
        await setEnds(which === 'a' ? latent : state.a, which === 'b' ? latent : state.b);
      } catch (error) {
        fail(error);
      }
    });
  }
  if ('gpu' in navigator) {
    $('backend-choice').hidden = false;
    $('backend').value = backend;
    $('backend').addEventListener('change', (event) => {
      location.search = `?backend=${event.target.value}`;
    });
  }
}

async function main() {
  const started = performance.now();
  await chooseBackend();
  const ort = await loadRuntime();
  state.model = await VAEModel.load(ort, readModelFile, sha256, {
    sessionOptions: { executionProviders: backend === 'webgpu' ? ['webgpu', 'wasm'] : ['wasm'] },
  });
  for (let s = 0; s < STRIP_STEPS; s++) {
    const canvas = document.createElement('canvas');
    canvas.width = canvas.height = IMAGE_SIZE;
    $('strip').append(canvas);
  }
  showCard(state.model.card);
  wire();
  await setEnds(prior(1), prior(2));
  await show(planePoint(state.basis, 0, 0));
  const threads = ort.env.wasm.numThreads;
  $('status').textContent = `${backendNote}${backend === 'webgpu' ? 'WebGPU' : 'WebAssembly'}, ${threads} thread${threads > 1 ? 's' : ''}; ` +
    `model verified against SHA256SUMS and loaded in ${(performance.now() - started).toFixed(0)} ms`;
  window.vae = {
    latentDim: state.model.latentDim,
    backend,
    threads,
    /** Decode one latent (an array) onto the page's image. */
    show: async (latent) => { await show(Float32Array.from(latent)); },
    /** Decode `count` single images at prior samples; the median milliseconds per call. */
    benchmark: async (count = 50) => {
      const times = [];
      for (let i = 0; i < count; i++) {
        const started = performance.now();
        await state.model.decode(prior(1000 + i), 1);
        times.push(performance.now() - started);
      }
      return median(times);
    },
    timings: () => [...state.timings],
    /** The latents A and B that span the pad's plane. */
    ends: () => [Array.from(state.a), Array.from(state.b)],
  };
  document.body.dataset.ready = 'true';
}

main().catch(fail);
