'use strict';
// Reconstruct images with a fastvae vae export: z = mean + sigma * eps, eps ~ N(0, I) (zeros with --mean);
// writes originals above reconstructions as a PNG grid and/or the reconstructions as a float32 .npy.

const crypto = require('node:crypto');
const { ClientError, runMain } = require('./lib/errors');
const { MAX_GRID_IMAGES, parseOptions, integerOption, checkOutput, writeAtomic } = require('./lib/cli');
const { loadModel, run } = require('./lib/model');
const { readNpy, npyBytes } = require('./lib/npy');
const { standardNormal } = require('./lib/normal');
const { imageGrid, pngBytes } = require('./lib/grid');

const USAGE = 'node reconstruct.js VAE.onnx IMAGES.npy [--seed S | --mean] [--out recon.png] [--out-npy recon.npy]';
const OPTIONS = {
  seed: { type: 'string' }, mean: { type: 'boolean' }, out: { type: 'string' }, 'out-npy': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
};

/** The images of `path` as float32 (N, C, H, W) in [0, 1]: float32 as they are, uint8 divided by 255. */
function readImages(path, imageShape) {
  const { descr, shape, data } = readNpy(path, ['<f4', '|u1']);
  const [c, h, w] = imageShape;
  // (N, H, W) is taken as (N, 1, H, W) for a grayscale model.
  const fits = shape.length === 4 ? shape.slice(1).every((d, i) => d === imageShape[i])
    : shape.length === 3 && c === 1 && shape[1] === h && shape[2] === w;
  if (!fits || shape[0] < 1) {
    throw new ClientError(`${path} must hold images of shape (N, ${c}, ${h}, ${w}) with N >= 1, got (${shape.join(', ')})`);
  }
  if (descr === '|u1') return { n: shape[0], images: Float32Array.from(data, (v) => v / 255) };
  for (const v of data) {
    if (!(v >= 0 && v <= 1)) {
      throw new ClientError(`${path} must hold values in [0, 1] (uint8 images: save them as uint8), found ${v}`);
    }
  }
  return { n: shape[0], images: data };
}

async function main(argv) {
  const parsed = parseOptions(argv, USAGE, ['VAE.onnx', 'IMAGES.npy'], OPTIONS);
  if (parsed === null) return 0;
  const { values, args: [modelPath, imagesPath] } = parsed;
  if (values.mean && values.seed !== undefined) throw new ClientError('--mean sets eps = 0: give it without --seed');
  const seed = integerOption(values, 'seed', undefined);
  const out = values.out ?? (values['out-npy'] === undefined ? 'recon.png' : undefined);
  if (out !== undefined) checkOutput(out, '--out', '.png');
  if (values['out-npy'] !== undefined) checkOutput(values['out-npy'], '--out-npy', '.npy');

  const model = await loadModel(modelPath, 'vae');
  const { n, images } = readImages(imagesPath, model.imageShape);
  if (out !== undefined && 2 * n > MAX_GRID_IMAGES) {
    throw new ClientError(`${n} images and their reconstructions are more than a PNG grid holds ` +
      `(${MAX_GRID_IMAGES}); give ${MAX_GRID_IMAGES / 2} or fewer, or write --out-npy only`);
  }
  const eps = values.mean ? new Float32Array(n * model.zDim)
    : standardNormal(n * model.zDim, seed ?? crypto.randomInt(2 ** 32)); // (N, Z)
  const shape = [n, ...model.imageShape];
  const { reconstruction } = await run(model, { images: [images, shape], eps: [eps, [n, model.zDim]] });
  if (out !== undefined) {
    const both = new Float32Array(2 * images.length); // originals, then reconstructions: (2N, C, H, W)
    both.set(images);
    both.set(reconstruction, images.length);
    writeAtomic(out, pngBytes(imageGrid(both, [2 * n, ...model.imageShape], n)), '--out');
  }
  if (values['out-npy'] !== undefined) writeAtomic(values['out-npy'], npyBytes(reconstruction, shape), '--out-npy');
  const written = [out, values['out-npy']].filter((p) => p !== undefined).join(' and ');
  console.log(`wrote ${written}: ${n} images from ${imagesPath} and their reconstructions by ${modelPath}`);
  return 0;
}

runMain(main);
