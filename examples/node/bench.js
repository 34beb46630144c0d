'use strict';
// Time decoder runs in Node: median (and 10th/90th percentiles) of --runs decodes per batch size after --warmup
// runs, one JSON line per batch. The timed span is what sample.js pays per run: tensor in, session.run, data out.

const { performance } = require('node:perf_hooks');
const { ClientError, runMain } = require('./lib/errors');
const { parseOptions, integerOption } = require('./lib/cli');
const { loadModel, decode } = require('./lib/model');
const { standardNormal } = require('./lib/normal');

const USAGE = 'node bench.js DECODER.onnx [--batch 1,64] [--runs 50] [--warmup 10]';
const OPTIONS = {
  batch: { type: 'string' }, runs: { type: 'string' }, warmup: { type: 'string' }, help: { type: 'boolean', short: 'h' },
};

function percentile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

async function main(argv) {
  const parsed = parseOptions(argv, USAGE, ['DECODER.onnx'], OPTIONS);
  if (parsed === null) return 0;
  const { values, args: [modelPath] } = parsed;
  const batches = (values.batch ?? '1,64').split(',').map(Number);
  if (!batches.every((b) => Number.isSafeInteger(b) && b >= 1)) {
    throw new ClientError(`--batch must be positive integers separated by commas, got ${values.batch}`);
  }
  const runs = integerOption(values, 'runs', 50, 1);
  const warmup = integerOption(values, 'warmup', 10, 0);
  const model = await loadModel(modelPath, 'decoder');
  for (const batch of batches) {
    const z = standardNormal(batch * model.zDim, batch);
    for (let i = 0; i < warmup; i++) await decode(model, z, batch);
    const times = [];
    for (let i = 0; i < runs; i++) {
      const start = performance.now();
      await decode(model, z, batch);
      times.push(performance.now() - start);
    }
    times.sort((a, b) => a - b);
    const round = (ms) => Number(ms.toFixed(4));
    console.log(JSON.stringify({ batch, runs, median_ms: round(percentile(times, 0.5)), p10_ms: round(percentile(times, 0.1)),
      p90_ms: round(percentile(times, 0.9)) }));
  }
  return 0;
}

runMain(main);
