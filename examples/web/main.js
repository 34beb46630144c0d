// The page: loads model.onnx (or an export dropped on it), times decoding, draws samples, one latent under
// sliders, an interpolation strip, and reconstructions of the user's pictures. window.fastvae is the hook that
// tests (and the console) drive.

import * as ort from "onnxruntime-web";
import { drawGrid, pictureToImage } from "./draw.js";
import { Model, ModelError } from "./vae.js";

const SAMPLES = 16, SAMPLE_COLUMNS = 4, SLIDERS = 8, SLIDER_RANGE = 3, STEPS = 10;
const WARMUP = 3, RUNS = 20, BATCHES = [1, 64]; // the decode timing taken at load
const SCALE = 4; // screen pixels per image pixel

const $ = (id) => document.getElementById(id);
// ?threads=N sets onnxruntime-web's WASM threads (its default: min(4, logical cores / 2)). More than one needs
// the page cross-origin isolated, as `fastvae serve-web` serves it.
const threads = Number(new URLSearchParams(location.search).get("threads"));
if (Number.isInteger(threads) && threads > 0) ort.env.wasm.numThreads = threads;
const state = { decoder: null, recon: null, picture: null, z: null, ends: null, timings: null, renders: 0 };
let markReady;
const ready = new Promise((resolve) => (markReady = resolve));

window.fastvae = {
  ready, // resolves with info() once the first decoder has drawn everything and been timed
  /** Latents Float32Array (n, Z) -> images Float32Array (n, C, H, W) in [0, 1], through the page's decoder. */
  decode: async (z, n) => {
    if (!state.decoder) throw new Error("no decoder loaded yet: await fastvae.ready");
    return state.decoder.decode(z, n);
  },
  info,
  get renders() { return state.renders; }, // latent redraws so far: each slider move adds at least one
};

function info() {
  const { name, zDim, imageShape } = state.decoder;
  return { name, zDim, imageShape, ms: state.timings, threads: ort.env.wasm.numThreads };
}

/** n draws from N(0, 1) (Box-Muller on Math.random). */
function randn(n) {
  const z = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const radius = Math.sqrt(-2 * Math.log(1 - Math.random())), angle = 2 * Math.PI * Math.random();
    z[i] = radius * Math.cos(angle);
    if (i + 1 < n) z[i + 1] = radius * Math.sin(angle);
  }
  return z;
}

/** Median ms of RUNS decodes of one random batch, after WARMUP untimed ones (the first runs allocate). */
async function timeDecode(model, batch) {
  const z = randn(batch * model.zDim), times = [];
  for (let i = 0; i < WARMUP + RUNS; i++) {
    const start = performance.now();
    await model.decode(z, batch);
    if (i >= WARMUP) times.push(performance.now() - start);
  }
  times.sort((a, b) => a - b);
  return (times[(RUNS - 1) >> 1] + times[RUNS >> 1]) / 2;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

/** A user's bad file is a message on the page; anything else is a bug in the page, and goes to the console too. */
function report(error) {
  status(error.message ?? String(error), true);
  if (!(error instanceof ModelError)) console.error(error);
}

async function useDecoder(model) {
  const old = state.decoder;
  state.decoder = model;
  if (old) await old.release();
  setControls(false);
  const [c, h, w] = model.imageShape;
  state.z = randn(model.zDim);
  state.ends = [randn(model.zDim), randn(model.zDim)];
  buildSliders(model.zDim);
  await Promise.all([drawSamples(), drawLatent(), drawInterpolation(), drawOwn().catch(report)]);
  status(`${model.name}: decoder, z_dim ${model.zDim}, images ${c}×${h}×${w}`);
  $("timing").textContent = "timing the decoder…";
  state.timings = {};
  for (const batch of BATCHES) state.timings[batch] = await timeDecode(model, batch);
  showTiming();
  setControls(true);
  markReady(info());
}

function showTiming() {
  const threads = ort.env.wasm.numThreads, [big] = BATCHES.slice(-1);
  const parts = BATCHES.map((b) => `batch ${b}: <span id="ms-${b}" data-ms="${state.timings[b]}">` +
                                   `${state.timings[b].toFixed(2)}</span> ms`);
  $("timing").innerHTML = `Decode, median of ${RUNS} after ${WARMUP} warm-up runs: ${parts.join(" · ")} ` +
    `(${Math.round((1000 * big) / state.timings[big]).toLocaleString("en")} images/s); WASM, ${threads} ` +
    `thread${threads === 1 ? "" : "s"}${crossOriginIsolated ? "" : " (page not cross-origin isolated)"}`;
}

function setControls(enabled) {
  for (const element of document.querySelectorAll("button, #sliders input")) element.disabled = !enabled;
}

function buildSliders(zDim) {
  const rows = [];
  for (let i = 0; i < Math.min(SLIDERS, zDim); i++) {
    const label = Object.assign(document.createElement("label"), { htmlFor: `z${i}`, textContent: `z[${i}]` });
    const slider = Object.assign(document.createElement("input"), {
      type: "range", id: `z${i}`, min: -SLIDER_RANGE, max: SLIDER_RANGE, step: 0.01, disabled: true,
    });
    const output = document.createElement("output");
    slider.addEventListener("input", () => {
      state.z[i] = Number(slider.value);
      output.textContent = state.z[i].toFixed(2);
      drawLatent().catch(report);
    });
    rows.push(label, slider, output);
  }
  $("sliders").replaceChildren(...rows);
  syncSliders();
}

function syncSliders() {
  for (const slider of $("sliders").querySelectorAll("input")) {
    const value = state.z[Number(slider.id.slice(1))];
    slider.value = value;
    slider.nextElementSibling.textContent = value.toFixed(2);
  }
}

async function drawSamples() {
  const model = state.decoder;
  const images = await model.decode(randn(SAMPLES * model.zDim), SAMPLES);
  drawGrid($("samples"), images, SAMPLES, model.imageShape, SAMPLE_COLUMNS, SCALE);
}

// Slider input events come faster than decodes: at most one decode runs, and one more follows with the latest z.
let latentBusy = false, latentAgain = false;
async function drawLatent() {
  if (latentBusy) {
    latentAgain = true;
    return;
  }
  latentBusy = true;
  try {
    do {
      latentAgain = false;
      const model = state.decoder;
      const { images: image, ms } = await model.decodeTimed(state.z.slice(), 1);
      drawGrid($("latent"), image, 1, model.imageShape, 1, 2 * SCALE);
      $("latent-ms").textContent = `decoded in ${ms.toFixed(2)} ms`;
      state.renders++;
    } while (latentAgain);
  } finally {
    latentBusy = false;
  }
}

async function drawInterpolation() {
  const model = state.decoder, [a, b] = state.ends, zDim = model.zDim;
  const z = new Float32Array(STEPS * zDim);
  for (let s = 0; s < STEPS; s++) {
    const t = s / (STEPS - 1);
    for (let i = 0; i < zDim; i++) z[s * zDim + i] = (1 - t) * a[i] + t * b[i];
  }
  drawGrid($("interpolation"), await model.decode(z, STEPS), STEPS, model.imageShape, STEPS, SCALE);
}

/** The user's picture as the model sees it, beside its reconstruction when a vae (or an encoder matching the
 * decoder) is loaded. */
async function drawOwn() {
  const { recon, picture, decoder } = state;
  if (!picture) return;
  const shape = (recon ?? decoder)?.imageShape ?? [1, 28, 28];
  const image = pictureToImage(picture.bitmap, shape, $("invert").checked);
  $("own").hidden = false;
  if (!recon) {
    drawGrid($("own"), image, 1, shape, 1, 2 * SCALE);
    $("own-status").textContent = `${picture.name}: drop a vae export to reconstruct it`;
    return;
  }
  let output;
  if (recon.part === "vae") output = await recon.reconstruct(image, 1);
  else {
    const fits = decoder && decoder.zDim === recon.zDim && decoder.imageShape.join() === recon.imageShape.join();
    if (!fits) throw new ModelError(`${recon.name} is an encoder that does not match the decoder: drop a vae export`);
    output = await decoder.decode(await recon.encode(image, 1), 1);
  }
  const both = new Float32Array(2 * image.length);
  both.set(image);
  both.set(output, image.length);
  drawGrid($("own"), both, 2, shape, 2, 2 * SCALE);
  $("own-status").textContent = `${picture.name} as the model sees it, and its reconstruction by ${recon.name}`;
}

async function openFile(file) {
  if (file.name.toLowerCase().endsWith(".onnx")) {
    status(`loading ${file.name}…`);
    const model = await Model.load(new Uint8Array(await file.arrayBuffer()), file.name);
    if (model.part === "decoder") return useDecoder(model);
    await state.recon?.release();
    state.recon = model;
    status(`${state.decoder?.name ?? "no decoder"}: decoder · ${model.name}: ${model.part} for your pictures`);
    return drawOwn();
  }
  if (!file.type.startsWith("image/")) throw new ModelError(`${file.name}: drop an .onnx export or a picture`);
  try {
    state.picture = { name: file.name, bitmap: await createImageBitmap(file) };
  } catch {
    throw new ModelError(`${file.name} is not a picture this browser can decode`);
  }
  return drawOwn();
}

async function openFiles(files) {
  try {
    for (const file of files) await openFile(file); // in order: a vae and a picture dropped together both work
  } catch (e) {
    report(e);
  }
}

function wire() {
  $("resample").addEventListener("click", () => drawSamples().catch(report));
  $("randomize").addEventListener("click", () => {
    state.z = randn(state.decoder.zDim);
    syncSliders();
    drawLatent().catch(report);
  });
  $("ends").addEventListener("click", () => {
    state.ends = [randn(state.decoder.zDim), randn(state.decoder.zDim)];
    drawInterpolation().catch(report);
  });
  $("invert").addEventListener("change", () => drawOwn().catch(report));
  $("file").addEventListener("change", (e) => openFiles([...e.target.files]));
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    openFiles([...e.dataTransfer.files]);
  });
}

async function start() {
  wire();
  const response = await fetch("model.onnx");
  if (!response.ok) {
    status(`no model.onnx next to the page (HTTP ${response.status}): drop a decoder export here`, true);
    return;
  }
  await useDecoder(await Model.load(new Uint8Array(await response.arrayBuffer()), "model.onnx"));
}

start().catch(report);
