'use strict';
// Loads a fastvae ONNX export (decoder, encoder or vae part), checks it is the part asked for, and runs it.

const fs = require('node:fs');
const ort = require('onnxruntime-node');
const { ClientError, oneLine } = require('./errors');
const { readMetadataProps } = require('./onnx-metadata');

// The graph contract of each part written by `fastvae export` (as fastvae/runtime.py's INPUTS and OUTPUTS).
const INPUTS = { decoder: ['z'], encoder: ['images'], vae: ['images', 'eps'] };
const OUTPUTS = { decoder: ['images'], encoder: ['mean', 'log_sigma'], vae: ['reconstruction', 'mean', 'log_sigma'] };
const META_PART = 'fastvae.part';
const META_Z_DIM = 'fastvae.z_dim';
const META_IMAGE_SHAPE = 'fastvae.image_shape';

/** Open `path` as the fastvae `part` ('decoder' or 'vae'): { session, part, zDim, imageShape: [C, H, W] }.
 * A missing, truncated or foreign file, or another part, raises ClientError naming what was expected. */
async function loadModel(path, part) {
  let bytes;
  try {
    bytes = fs.readFileSync(path);
  } catch (e) {
    const why = e.code === 'ENOENT' ? 'no such file' : e.code === 'EISDIR' ? 'it is a directory' : e.message;
    throw new ClientError(`cannot read the ONNX model ${path}: ${why}; expected a file written by ` +
      `\`fastvae export --part ${part}\``);
  }
  if (bytes.length === 0) throw new ClientError(`${path} is empty: expected an ONNX file from \`fastvae export\``);
  const meta = readMetadataProps(bytes, path);
  const zDim = Number(meta.get(META_Z_DIM));
  let imageShape;
  try {
    imageShape = JSON.parse(meta.get(META_IMAGE_SHAPE));
  } catch {
    imageShape = null;
  }
  const sizes = Array.isArray(imageShape) && imageShape.length === 3 && imageShape.every((d) => Number.isInteger(d) && d > 0);
  if (!meta.has(META_PART) || !Number.isInteger(zDim) || zDim < 1 || !sizes) {
    throw new ClientError(`${path} is an ONNX model but not a fastvae export (its metadata has no valid ` +
      `${META_PART}, ${META_Z_DIM} and ${META_IMAGE_SHAPE})`);
  }
  const found = meta.get(META_PART);
  if (found !== part) {
    throw new ClientError(`${path} holds the '${found}' part, but this script needs the '${part}' part; ` +
      `write one with \`fastvae export --part ${part}\``);
  }
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, { graphOptimizationLevel: 'all', logSeverityLevel: 4 });
  } catch (e) {
    throw new ClientError(`${path} is not a loadable ONNX model (corrupt, truncated or not ONNX): ${oneLine(e)}`);
  }
  checkGraph(session, path, part, zDim, imageShape);
  return { session, path, part, zDim, imageShape };
}

/** The graph's inputs and outputs are the part's names, float32, batch first and the metadata's other sizes. */
function checkGraph(session, path, part, zDim, imageShape) {
  const names = [session.inputNames, session.outputNames];
  if (JSON.stringify(names) !== JSON.stringify([INPUTS[part], OUTPUTS[part]])) {
    throw new ClientError(`${path}: part '${part}' with inputs/outputs ${JSON.stringify(names)} is not a fastvae export`);
  }
  for (const value of [...session.inputMetadata, ...session.outputMetadata]) {
    const rest = ['images', 'reconstruction'].includes(value.name) ? imageShape : [zDim];
    const ok = value.isTensor && value.type === 'float32' && value.shape.length === rest.length + 1 &&
      rest.every((d, i) => value.shape[i + 1] === d);
    if (!ok) {
      throw new ClientError(`${path}: the graph's ${value.name} is ${value.type} [${value.shape}] but its metadata ` +
        `says float32 [batch, ${rest}]: the file is damaged or not a fastvae export`);
    }
  }
}

/** Run `model` on `feeds` ({ name: [Float32Array, dims] }) -> { name: Float32Array } for every output. */
async function run(model, feeds) {
  const tensors = {};
  for (const [name, [data, dims]] of Object.entries(feeds)) tensors[name] = new ort.Tensor('float32', data, dims);
  let results;
  try {
    results = await model.session.run(tensors);
  } catch (e) {
    throw new ClientError(`${model.path} could not be run by onnxruntime (damaged or not a fastvae export): ${oneLine(e)}`);
  }
  const out = {};
  for (const name of OUTPUTS[model.part]) {
    out[name] = results[name].data;
    // A checkpoint with a NaN weight gives NaN images that would save as black PNGs.
    if (!out[name].every(Number.isFinite)) {
      throw new ClientError(`${model.path} produced NaN or infinite values: the model's weights are broken`);
    }
  }
  return out;
}

/** Latents (B * Z, row-major) -> images (B * C * H * W) float32 in [0, 1]. */
async function decode(model, z, batch) {
  return (await run(model, { z: [z, [batch, model.zDim]] })).images;
}

module.exports = { loadModel, run, decode, INPUTS, OUTPUTS };
