// The artifact's decoder and encoder through onnxruntime's JavaScript API: the same code in
// the browser page (onnxruntime-web) and the Node.js program (onnxruntime-node). It imports
// nothing: the caller passes its `ort` module and how to read a file of the artifact.

export const DECODER_FILE = 'decoder.onnx';
export const ENCODER_FILE = 'encoder.onnx';
export const CARD_FILE = 'model_card.json';
export const CHECKSUMS_FILE = 'SHA256SUMS';
export const IMAGE_SIZE = 28;
export const PIXELS = IMAGE_SIZE * IMAGE_SIZE;

export class ArtifactError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ArtifactError';
  }
}

/** `SHA256SUMS` ("<64 hex>  <name>" per line) -> Map(name -> hex digest). */
export function parseChecksums(text) {
  const sums = new Map();
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    const match = /^([0-9a-f]{64}) [ *](.+)$/.exec(line.trim());
    if (!match) throw new ArtifactError(`${CHECKSUMS_FILE}: not a checksum line: ${JSON.stringify(line.slice(0, 80))}`);
    sums.set(match[2], match[1]);
  }
  return sums;
}

/**
 * Read the named files of an artifact and check each against SHA256SUMS.
 * readFile(name) -> Promise<Uint8Array>; sha256(bytes) -> Promise<hex string>.
 */
export async function readVerified(readFile, sha256, names) {
  const sums = parseChecksums(new TextDecoder().decode(await readFile(CHECKSUMS_FILE)));
  const files = {};
  for (const name of names) {
    const expected = sums.get(name);
    if (!expected) throw new ArtifactError(`${name} is not listed in ${CHECKSUMS_FILE}`);
    const bytes = await readFile(name);
    const actual = await sha256(bytes);
    if (actual !== expected) {
      throw new ArtifactError(`${name} does not match ${CHECKSUMS_FILE} (sha256 ${actual.slice(0, 12)}..., expected ${expected.slice(0, 12)}...): the artifact was changed or damaged`);
    }
    files[name] = bytes;
  }
  return files;
}

export class VAEModel {
  constructor(ort, decoder, encoder, card) {
    this.ort = ort;
    this.decoder = decoder;
    this.encoder = encoder;
    this.card = card;
    this.latentDim = card.latent_dim;
  }

  /** Load and verify an artifact. options: sessionOptions (onnxruntime), encoder (default true). */
  static async load(ort, readFile, sha256, options = {}) {
    const withEncoder = options.encoder ?? true;
    const names = [CARD_FILE, DECODER_FILE, ...(withEncoder ? [ENCODER_FILE] : [])];
    const files = await readVerified(readFile, sha256, names);
    const card = JSON.parse(new TextDecoder().decode(files[CARD_FILE]));
    if (!Number.isInteger(card.latent_dim) || card.latent_dim < 1) {
      throw new ArtifactError(`${CARD_FILE}: latent_dim ${card.latent_dim} is not a positive integer`);
    }
    const sessionOptions = options.sessionOptions ?? {};
    const decoder = await ort.InferenceSession.create(files[DECODER_FILE], sessionOptions);
    const encoder = withEncoder ? await ort.InferenceSession.create(files[ENCODER_FILE], sessionOptions) : null;
    return new VAEModel(ort, decoder, encoder, card);
  }

  /** Float32Array of n * latentDim -> Float32Array of n * 784 pixels in [0, 1]. */
  async decode(latents, n) {
    if (latents.length !== n * this.latentDim) {
      throw new RangeError(`expected ${n} x ${this.latentDim} latent values, got ${latents.length}`);
    }
    const z = new this.ort.Tensor('float32', Float32Array.from(latents), [n, this.latentDim]);
    const { image } = await this.decoder.run({ z });
    const pixels = image.data;
    for (let i = 0; i < pixels.length; i++) {
      if (!Number.isFinite(pixels[i])) throw new ArtifactError(`${DECODER_FILE} gave a non-finite pixel: the model is broken`);
    }
    return pixels;
  }

  /** Float32Array of n * 784 pixels in [0, 1] -> { zMean, zLogVar }, each n * latentDim. */
  async encode(images, n) {
    if (!this.encoder) throw new Error('this model was loaded without its encoder');
    if (images.length !== n * PIXELS) throw new RangeError(`expected ${n} x ${PIXELS} pixels, got ${images.length}`);
    const image = new this.ort.Tensor('float32', Float32Array.from(images), [n, IMAGE_SIZE, IMAGE_SIZE, 1]);
    const outputs = await this.encoder.run({ image });
    return { zMean: outputs.z_mean.data, zLogVar: outputs.z_log_var.data };
  }
}

/** A seeded uniform generator in [0, 1) (mulberry32): the same numbers in every engine. */
export function uniform(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** n standard normal values (Box-Muller) from a seed. */
export function normals(seed, n) {
  const next = uniform(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const radius = Math.sqrt(-2 * Math.log(1 - next()));
    const angle = 2 * Math.PI * next();
    out[i] = radius * Math.cos(angle);
    if (i + 1 < n) out[i + 1] = radius * Math.sin(angle);
  }
  return out;
}

/**
 * An orthonormal pair spanning the plane through the origin and the latents a and b
 * (Gram-Schmidt). For a 2-D latent, or a and b parallel, it falls back to axes.
 */
export function planeBasis(a, b) {
  const dim = a.length;
  const unit = (v) => {
    const norm = Math.hypot(...v);
    return norm > 1e-6 ? v.map((x) => x / norm) : null;
  };
  const axis = (k) => Array.from({ length: dim }, (_, i) => (i === k ? 1 : 0));
  if (dim === 2) return [axis(0), axis(1)];
  const first = unit(Array.from(a)) ?? axis(0);
  const dot = Array.from(b).reduce((sum, x, i) => sum + x * first[i], 0);
  const second = unit(Array.from(b, (x, i) => x - dot * first[i])) ?? unit(axis(1).map((x, i) => x - first[1] * first[i]));
  return [first, second];
}

/** The latent at plane coordinates (u, v). */
export function planePoint([first, second], u, v) {
  return Float32Array.from(first, (x, i) => u * x + v * second[i]);
}

/** steps latents evenly from a to b, both included, as one Float32Array. */
export function interpolate(a, b, steps) {
  const dim = a.length;
  const out = new Float32Array(steps * dim);
  for (let s = 0; s < steps; s++) {
    const t = steps === 1 ? 0 : s / (steps - 1);
    for (let i = 0; i < dim; i++) out[s * dim + i] = (1 - t) * a[i] + t * b[i];
  }
  return out;
}

/** Pixels in [0, 1] -> 8-bit grey levels, ink dark on white, as the Python side's PNGs. */
export function inkLevels(pixels) {
  return Uint8Array.from(pixels, (p) => 255 - Math.round(Math.min(1, Math.max(0, p)) * 255));
}
