'use strict';
// Decode z ~ N(0, I), or latents from a .npy file, with a fastvae decoder export; write a PNG grid and/or a
// float32 (N, C, H, W) .npy of the images.

const crypto = require('node:crypto');
const { ClientError, runMain } = require('./lib/errors');
const { MAX_GRID_IMAGES, parseOptions, integerOption, checkOutput, writeAtomic } = require('./lib/cli');
const { loadModel, decode } = require('./lib/model');
const { readNpy, npyBytes } = require('./lib/npy');
const { standardNormal } = require('./lib/normal');
const { imageGrid, pngBytes } = require('./lib/grid');

const USAGE = 'node sample.js DECODER.onnx [--n 64] [--seed S] [--z LATENTS.npy] [--out samples.png] ' +
  '[--out-npy images.npy]';
const OPTIONS = {
  n: { type: 'string' }, seed: { type: 'string' }, z: { type: 'string' }, latents: { type: 'string' },
  out: { type: 'string' }, 'out-npy': { type: 'string' }, help: { type: 'boolean', short: 'h' },
};
const CHUNK = 256; // images decoded per run: bounds onnxruntime's working memory for large --n

async function main(argv) {
  const parsed = parseOptions(argv, USAGE, ['DECODER.onnx'], OPTIONS);
  if (parsed === null) return 0;
  const { values, args: [modelPath] } = parsed;
  const zPath = values.z ?? values.latents;
  if (zPath !== undefined && (values.n !== undefined || values.seed !== undefined)) {
    throw new ClientError('--z decodes the latents in its file: give it without --n and --seed');
  }
  const n = integerOption(values, 'n', 64, 1);
  const seed = integerOption(values, 'seed', undefined);
  const out = values.out ?? (values['out-npy'] === undefined ? 'samples.png' : undefined);
  const latents = zPath === undefined ? null : readNpy(zPath); // (B, Z) float32, read before the model loads
  const count = latents === null ? n : latents.shape[0];
  if (out !== undefined) {
    if (count > MAX_GRID_IMAGES) {
      throw new ClientError(`${count} images is more than a PNG grid holds (${MAX_GRID_IMAGES}); ` +
        'write them with --out-npy only');
    }
    checkOutput(out, '--out', '.png');
  }
  if (values['out-npy'] !== undefined) checkOutput(values['out-npy'], '--out-npy', '.npy');

  const model = await loadModel(modelPath, 'decoder');
  const zDim = model.zDim;
  if (latents !== null && (latents.shape.length !== 2 || latents.shape[1] !== zDim || count < 1)) {
    throw new ClientError(`${zPath} must hold float32 latents of shape (B, ${zDim}) with B >= 1, got ` +
      `(${latents.shape.join(', ')})`);
  }
  // (N, Z): seeded normals when no file is given (fresh randomness without --seed).
  const z = latents?.data ?? standardNormal(count * zDim, seed ?? crypto.randomInt(2 ** 32));
  if (!z.every(Number.isFinite)) throw new ClientError(`${zPath} contains NaN or infinity`);

  const shape = [count, ...model.imageShape];
  const imageSize = model.imageShape.reduce((a, b) => a * b, 1);
  const images = new Float32Array(count * imageSize); // (N, C, H, W)
  for (let start = 0; start < count; start += CHUNK) {
    const stop = Math.min(start + CHUNK, count);
    images.set(await decode(model, z.subarray(start * zDim, stop * zDim), stop - start), start * imageSize);
  }
  if (out !== undefined) writeAtomic(out, pngBytes(imageGrid(images, shape, Math.ceil(Math.sqrt(count)))), '--out');
  if (values['out-npy'] !== undefined) writeAtomic(values['out-npy'], npyBytes(images, shape), '--out-npy');
  const written = [out, values['out-npy']].filter((p) => p !== undefined).join(' and ');
  console.log(`wrote ${written}: ${count} images from ${modelPath}`);
  return 0;
}

runMain(main);
