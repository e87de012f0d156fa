#!/usr/bin/env node
// vae-node: decode latents with an exported artifact's decoder.onnx in Node.js.
//
//   vae-node --model ARTIFACT_DIR --latents latents.json --out images.json
//   vae-node --model ARTIFACT_DIR --n 16 --seed 0 --out grid.png
//
// The artifact is checked against its SHA256SUMS before anything is loaded. Latents come
// from a JSON file ([[...], ...] or {"latents": [[...], ...]}) or are drawn from the prior
// with a seed; the images go to a PNG grid (ink dark on white, as `vae-generate` draws
// it) or to JSON ({"images": n x 28 x 28 values in [0, 1]}). Every error is one line and
// exit status 2; the output file appears only once it is complete.
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { parseArgs } from 'node:util';

import * as ort from 'onnxruntime-node';
import { PNG } from 'pngjs';

import { IMAGE_SIZE, PIXELS, VAEModel, inkLevels, normals } from '../web/model.mjs';

const CELL = IMAGE_SIZE + 2; // a 1-pixel white gutter on each side, as deploy/png.py
const MAX_IMAGES = 65536;
const USAGE = 'usage: vae-node --model DIR (--latents FILE.json | --n N [--seed S] [--temperature T]) --out FILE.png|FILE.json';
const VALUED = ['--model', '--latents', '--n', '--seed', '--temperature', '--out'];
const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

class UsageError extends Error {}

/** `--n -1` as `--n=-1`: a value that starts with a dash is still the option's value, so
 * that the range check, not the parser's "ambiguous" paragraph, says what is wrong. */
function joinNegativeValues(argv) {
  const joined = [];
  for (let i = 0; i < argv.length; i++) {
    if (VALUED.includes(argv[i]) && /^-[0-9.]/.test(argv[i + 1] ?? '')) joined.push(`${argv[i]}=${argv[++i]}`);
    else joined.push(argv[i]);
  }
  return joined;
}

function options(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: joinNegativeValues(argv),
      options: {
        model: { type: 'string' }, latents: { type: 'string' }, n: { type: 'string' },
        seed: { type: 'string', default: '0' }, temperature: { type: 'string', default: '1' },
        out: { type: 'string' }, help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (error) {
    throw new UsageError(error.message.split('\n')[0]);
  }
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (!values.model || !values.out) throw new UsageError('--model and --out are required');
  if ((values.latents === undefined) === (values.n === undefined)) throw new UsageError('give exactly one of --latents and --n');
  if (!/\.(png|json)$/.test(values.out)) throw new UsageError(`--out must end in .png or .json, got ${values.out}`);
  return values;
}

function integer(text, name, low, high) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < low || value > high) throw new UsageError(`--${name} must be an integer in [${low}, ${high}], got ${text}`);
  return value;
}

/** A JSON file of latents -> [Float32Array of n * dim, n]. */
function readLatents(path, dim) {
  let rows;
  try {
    rows = JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    throw new UsageError(`${path}: ${error.code === 'ENOENT' ? 'no such file' : `not JSON (${error.message})`}`);
  }
  rows = Array.isArray(rows) ? rows : rows?.latents;
  if (!Array.isArray(rows) || rows.length === 0 || rows.length > MAX_IMAGES) {
    throw new UsageError(`${path}: expected a list of 1 to ${MAX_IMAGES} latents (or {"latents": [...]})`);
  }
  const flat = new Float32Array(rows.length * dim);
  rows.forEach((row, i) => {
    if (!Array.isArray(row) || row.length !== dim) throw new UsageError(`${path}: latent ${i} must hold ${dim} numbers (the model's latent size)`);
    row.forEach((x, j) => {
      if (typeof x !== 'number' || !Number.isFinite(x)) throw new UsageError(`${path}: latent ${i} value ${j} is not a finite number: ${x}`);
      if (!Number.isFinite(Math.fround(x))) throw new UsageError(`${path}: latent ${i} value ${j} is ${x}, beyond float32's range (the model's input type)`);
      flat[i * dim + j] = x;
    });
  });
  return [flat, rows.length];
}

function pngGrid(pixels, n) {
  const columns = Math.ceil(Math.sqrt(n));
  const rows = Math.ceil(n / columns);
  const png = new PNG({ width: columns * CELL, height: rows * CELL, colorType: 0, inputColorType: 0, inputHasAlpha: false });
  png.data = Buffer.alloc(png.width * png.height, 255);
  for (let k = 0; k < n; k++) {
    const levels = inkLevels(pixels.subarray(k * PIXELS, (k + 1) * PIXELS));
    const left = (k % columns) * CELL + 1;
    const top = Math.floor(k / columns) * CELL + 1;
    for (let y = 0; y < IMAGE_SIZE; y++) {
      png.data.set(levels.subarray(y * IMAGE_SIZE, (y + 1) * IMAGE_SIZE), (top + y) * png.width + left);
    }
  }
  return PNG.sync.write(png, { colorType: 0, inputColorType: 0, inputHasAlpha: false });
}

function jsonImages(pixels, n) {
  const images = [];
  for (let k = 0; k < n; k++) {
    const image = [];
    for (let y = 0; y < IMAGE_SIZE; y++) image.push(Array.from(pixels.subarray(k * PIXELS + y * IMAGE_SIZE, k * PIXELS + (y + 1) * IMAGE_SIZE)));
    images.push(image);
  }
  return Buffer.from(JSON.stringify({ images }));
}

/** `--out` may be new, or a file this program (or vae-generate) could have written: a PNG
 * for .png, a JSON object with "images" for .json. Anything else is not ours to replace. */
function checkOut(path) {
  if (!existsSync(path)) return;
  if (statSync(path).isDirectory()) throw new UsageError(`${path}: is a directory; --out names the file to write`);
  const bytes = readFileSync(path);
  let ours;
  if (path.endsWith('.png')) {
    ours = bytes.subarray(0, PNG_SIGNATURE.length).equals(PNG_SIGNATURE);
  } else {
    try {
      ours = Array.isArray(JSON.parse(bytes.toString('utf8'))?.images);
    } catch {
      ours = false;
    }
  }
  if (!ours) throw new UsageError(`${path}: exists and is not ${path.endsWith('.png') ? 'a PNG file' : 'a JSON file of images'}; refusing to replace it`);
}

function writeAtomically(path, bytes) {
  const temporary = join(dirname(path), `.${basename(path)}.tmp-${process.pid}`);
  try {
    writeFileSync(temporary, bytes);
    renameSync(temporary, path);
  } catch (error) {
    rmSync(temporary, { force: true });
    throw error;
  }
}

async function main(argv) {
  const args = options(argv);
  checkOut(args.out);
  const model = await VAEModel.load(
    ort,
    async (name) => {
      try {
        return readFileSync(join(args.model, name));
      } catch (error) {
        throw new UsageError(`${join(args.model, name)}: ${error.code === 'ENOENT' ? 'missing (not an exported artifact?)' : error.message}`);
      }
    },
    async (bytes) => createHash('sha256').update(bytes).digest('hex'),
    { encoder: false },
  );
  let latents, n;
  if (args.latents !== undefined) {
    [latents, n] = readLatents(args.latents, model.latentDim);
  } else {
    n = integer(args.n, 'n', 1, MAX_IMAGES);
    const seed = integer(args.seed, 'seed', 0, 2 ** 32 - 1);
    const temperature = Number(args.temperature);
    if (!(temperature > 0 && temperature <= 10)) throw new UsageError(`--temperature must be in (0, 10], got ${args.temperature}`);
    latents = normals(seed, n * model.latentDim).map((x) => x * temperature);
  }
  const pixels = await model.decode(latents, n);
  writeAtomically(args.out, args.out.endsWith('.png') ? pngGrid(pixels, n) : jsonImages(pixels, n));
  console.log(`wrote ${args.out} (${n} image${n > 1 ? 's' : ''}, latent size ${model.latentDim}, onnxruntime-node ${ort.env.versions?.node ?? ''})`.replace(' )', ')'));
}

main(process.argv.slice(2)).catch((error) => {
  const hint = error instanceof UsageError && !error.message.includes(': ') ? ' (see vae-node --help)' : '';
  console.error(`vae-node: error: ${error.message.split('\n')[0]}${hint}`);
  process.exit(2);
});
