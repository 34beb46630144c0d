'use strict';
// Option parsing and output files shared by sample.js and reconstruct.js.

const fs = require('node:fs');
const nodePath = require('node:path');
const { parseArgs } = require('node:util');
const { ClientError } = require('./errors');

// A 64x64 grid, as fastvae's MAX_GRID_IMAGES: bigger PNGs are slow to write and refused by image viewers.
const MAX_GRID_IMAGES = 4096;

/** util.parseArgs, strict, with `positionals` (names) required and all string options. */
function parseOptions(argv, usage, positionals, options) {
  const { values, positionals: given } = parseArgs({ args: argv, options, allowPositionals: true, strict: true });
  if (values.help) {
    process.stdout.write(usage + '\n');
    return null;
  }
  if (given.length !== positionals.length) {
    throw new ClientError(`expected ${positionals.join(' and ')}, got ${given.length} argument(s); usage: ${usage}`);
  }
  return { values, args: given };
}

/** The integer value of `--name` (a string or undefined) >= `min`, or `fallback` when not given. */
function integerOption(values, name, fallback, min = 0) {
  const text = values[name];
  if (text === undefined) return fallback;
  if (!/^-?\d+$/.test(text) || !Number.isSafeInteger(Number(text)) || Number(text) < min) {
    throw new ClientError(`--${name} must be an integer >= ${min}, got ${JSON.stringify(text)}`);
  }
  return Number(text);
}

/** Before any slow work: `path` (given as `option`) must end in `suffix` and be writable; creates its folder. */
function checkOutput(path, option, suffix) {
  if (!path.toLowerCase().endsWith(suffix)) throw new ClientError(`${option} must end in ${suffix}, got ${path}`);
  let stat = null;
  try {
    stat = fs.statSync(path);
  } catch {
    // does not exist yet: fine
  }
  if (stat?.isDirectory()) throw new ClientError(`cannot write ${path} (${option}): it is a directory`);
  try {
    makeFolders(nodePath.resolve(nodePath.dirname(path)));
    fs.accessSync(nodePath.dirname(path), fs.constants.W_OK);
  } catch (e) {
    const why = e.code ? `${e.code} on its folder` : e.message;
    throw new ClientError(`cannot write ${path} (${option}): ${why}; choose another path`);
  }
}

/** mkdir -p, one level at a time. NOTE: Node 20's mkdirSync(..., { recursive: true }) spun forever at 100% CPU
 * on /proc/x (mkdir there fails with ENOENT although /proc exists). */
function makeFolders(folder) {
  if (fs.existsSync(folder)) {
    if (!fs.statSync(folder).isDirectory()) throw new Error(`${folder} is a file, not a folder`);
    return;
  }
  const parent = nodePath.dirname(folder);
  if (parent !== folder) makeFolders(parent);
  fs.mkdirSync(folder);
}

/** Write `bytes` to `path` atomically (a temporary file renamed over it), as one-line ClientErrors. */
function writeAtomic(path, bytes, option) {
  const temporary = nodePath.join(nodePath.dirname(path), `.${nodePath.basename(path)}.${process.pid}.tmp`);
  try {
    fs.writeFileSync(temporary, bytes);
    fs.renameSync(temporary, path);
  } catch (e) {
    try {
      fs.rmSync(temporary, { force: true });
    } catch {
      // nothing was written
    }
    throw new ClientError(`cannot write ${path} (${option}): ${e.code || e.message}`);
  }
}

module.exports = { MAX_GRID_IMAGES, parseOptions, integerOption, checkOutput, writeAtomic };
