// A fastvae ONNX export (decoder, encoder or vae part) on onnxruntime-web's WASM backend: the browser twin of
// fastvae/runtime.py's OnnxVAE. Latents are Float32Array (n, Z), images Float32Array (n, C, H, W) in [0, 1].

import * as ort from "onnxruntime-web";
import { NotOnnxError, readMetadata } from "./onnx-meta.js";

// The graph contract of each part, as in fastvae/runtime.py: input and output names, in order.
const INPUTS = { decoder: ["z"], encoder: ["images"], vae: ["images", "eps"] };
const OUTPUTS = { decoder: ["images"], encoder: ["mean", "log_sigma"], vae: ["reconstruction", "mean", "log_sigma"] };

/** A file the page cannot use, with a message for the user (not a bug in the page). */
export class ModelError extends Error {}

/** The contract in a file's metadata: { part, zDim, imageShape: [C, H, W] }. Throws ModelError. */
function contract(bytes, name) {
  let meta;
  try {
    meta = readMetadata(bytes);
  } catch (e) {
    if (e instanceof NotOnnxError) throw new ModelError(`${name} is not an ONNX file: ${e.message}`);
    throw e;
  }
  const part = meta.get("fastvae.part"), zDim = Number(meta.get("fastvae.z_dim"));
  let imageShape = null;
  try {
    imageShape = JSON.parse(meta.get("fastvae.image_shape") ?? "null");
  } catch {} // reported just below, with the other keys
  const sizes = Array.isArray(imageShape) && imageShape.length === 3 && imageShape.every((d) => Number.isInteger(d) && d > 0);
  if (!(part in INPUTS) || !Number.isInteger(zDim) || zDim < 1 || !sizes) {
    throw new ModelError(`${name} is not a fastvae export: its metadata lacks fastvae.part, fastvae.z_dim or ` +
                         "fastvae.image_shape (write one with `fastvae export`)");
  }
  return { part, zDim, imageShape };
}

export class Model {
  /** Load an export from its bytes (Uint8Array); `name` is only for messages. Throws ModelError. */
  static async load(bytes, name) {
    const { part, zDim, imageShape } = contract(bytes, name);
    let session;
    try {
      session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    } catch (e) {
      throw new ModelError(`onnxruntime-web cannot load ${name}: ${e.message ?? e}`);
    }
    const names = [session.inputNames, session.outputNames].map((n) => n.join(","));
    if (names[0] !== INPUTS[part].join(",") || names[1] !== OUTPUTS[part].join(",")) {
      await session.release();
      throw new ModelError(`${name}: part ${part} with inputs ${names[0]} and outputs ${names[1]} is not a fastvae export`);
    }
    return new Model(session, name, part, zDim, imageShape);
  }

  constructor(session, name, part, zDim, imageShape) {
    Object.assign(this, { session, name, part, zDim, imageShape });
    this.pixels = imageShape[0] * imageShape[1] * imageShape[2];
    this.queue = Promise.resolve(); // a session runs one call at a time: later calls wait their turn
  }

  /** Resolves to { outputs, ms }: ms times the session's run alone, not the wait for earlier calls. */
  run(feeds) {
    const result = this.queue.then(async () => {
      const start = performance.now();
      const outputs = await this.session.run(feeds);
      return { outputs, ms: performance.now() - start };
    });
    this.queue = result.catch(() => {});
    return result;
  }

  /** Latents (n, Z) -> images (n, C, H, W). Needs a decoder. */
  async decode(z, n) {
    return (await this.decodeTimed(z, n)).images;
  }

  /** decode(), and the ms its run took: { images, ms }. */
  async decodeTimed(z, n) {
    this.require("decoder");
    check(z, n * this.zDim, `z for ${n} latents of ${this.zDim}`);
    const { outputs, ms } = await this.run({ z: new ort.Tensor("float32", z, [n, this.zDim]) });
    return { images: outputs.images.data, ms };
  }

  /** Images (n, C, H, W) -> the posterior mean (n, Z). Needs an encoder or vae (run with eps = 0). */
  async encode(images, n) {
    this.require("encoder", "vae");
    check(images, n * this.pixels, `images for ${n} of ${this.imageShape.join("x")}`);
    const feeds = { images: new ort.Tensor("float32", images, [n, ...this.imageShape]) };
    if (this.part === "vae") feeds.eps = new ort.Tensor("float32", new Float32Array(n * this.zDim), [n, this.zDim]);
    return (await this.run(feeds)).outputs.mean.data;
  }

  /** Images (n, C, H, W) -> reconstructions decoded from the posterior mean (eps = 0). Needs a vae. */
  async reconstruct(images, n) {
    this.require("vae");
    check(images, n * this.pixels, `images for ${n} of ${this.imageShape.join("x")}`);
    const { outputs } = await this.run({
      images: new ort.Tensor("float32", images, [n, ...this.imageShape]),
      eps: new ort.Tensor("float32", new Float32Array(n * this.zDim), [n, this.zDim]),
    });
    return outputs.reconstruction.data;
  }

  require(...parts) {
    if (!parts.includes(this.part)) throw new ModelError(`${this.name} holds the ${this.part} part; this needs ${parts.join(" or ")}`);
  }

  release() {
    return this.queue.then(() => this.session.release());
  }
}

function check(array, length, what) {
  if (!(array instanceof Float32Array) || array.length !== length) {
    throw new TypeError(`expected a Float32Array of ${length} values (${what}), got ${array?.constructor?.name} of ${array?.length}`);
  }
}
