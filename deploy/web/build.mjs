// Copy the onnxruntime-web files the page loads from node_modules into ort/, which the
// page is served with: nothing is fetched from a CDN at run time. WebAssembly: ort.wasm +
// ort-wasm-simd-threaded; WebGPU (where the browser has it): ort.webgpu + its asyncify build.
import { copyFileSync, existsSync, mkdirSync, renameSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const source = join(here, 'node_modules', 'onnxruntime-web', 'dist');
const target = join(here, 'ort');
const files = [
  'ort.wasm.min.mjs', 'ort-wasm-simd-threaded.mjs', 'ort-wasm-simd-threaded.wasm',
  'ort.webgpu.min.mjs', 'ort-wasm-simd-threaded.asyncify.mjs', 'ort-wasm-simd-threaded.asyncify.wasm',
];

if (!existsSync(source)) {
  console.error(`build: ${source} is missing: run \`npm ci\` in ${here} first`);
  process.exit(1);
}
// Staged then renamed: a page never sees half the files.
const staging = `${target}.tmp-${process.pid}`;
mkdirSync(staging, { recursive: true });
for (const name of files) copyFileSync(join(source, name), join(staging, name));
rmSync(target, { recursive: true, force: true });
renameSync(staging, target);
console.log(`build: ${files.length} onnxruntime-web files in ${target}`);
