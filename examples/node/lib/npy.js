'use strict';
// A minimal .npy reader and writer (format versions 1-3): little-endian float32 (and uint8 when asked), C order.
// Written by hand: the npm .npy packages found were browser-fetch oriented or unmaintained, and this is ~80 lines.

const fs = require('node:fs');
const os = require('node:os');
const { ClientError } = require('./errors');

const MAGIC = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]); // "\x93NUMPY"
const ITEM_SIZE = { '<f4': 4, '|u1': 1, '<u1': 1 };

/** Read `path` -> { descr, shape: number[], data: Float32Array | Uint8Array }. `accept` lists the dtypes allowed
 * ('<f4' and, for images, '|u1'); anything else (float64, big-endian, Fortran order, ...) raises ClientError. */
function readNpy(path, accept = ['<f4']) {
  let buffer;
  try {
    buffer = fs.readFileSync(path);
  } catch (e) {
    throw new ClientError(`cannot read ${path}: ${e.code === 'ENOENT' ? 'no such file' : e.message}`);
  }
  if (buffer.length < 10 || !buffer.subarray(0, 6).equals(MAGIC)) {
    throw new ClientError(`${path} is not a .npy file (no \\x93NUMPY header); write it with numpy.save`);
  }
  const major = buffer[6];
  if (![1, 2, 3].includes(major)) throw new ClientError(`${path}: unknown .npy format version ${major}`);
  const headerLength = major === 1 ? buffer.readUInt16LE(8) : buffer.length >= 12 ? buffer.readUInt32LE(8) : -1;
  const start = (major === 1 ? 10 : 12) + headerLength;
  if (headerLength < 0 || start > buffer.length) throw new ClientError(`${path} is truncated (in its .npy header)`);
  const header = buffer.toString(major === 3 ? 'utf8' : 'latin1', major === 1 ? 10 : 12, start);
  const descr = /'descr'\s*:\s*'([^']*)'/.exec(header)?.[1];
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) {
    throw new ClientError(`${path}: cannot parse its .npy header ${JSON.stringify(header.trim())}`);
  }
  const allowed = accept.map((d) => `'${d}'`).join(' or ');
  if (!accept.includes(descr)) {
    throw new ClientError(`${path} holds dtype '${descr}'; this client reads ${allowed} only ` +
      "(little-endian float32: save it with np.save(path, array.astype('<f4')))");
  }
  if (fortran === 'True') {
    throw new ClientError(`${path} is in Fortran order; save it in C order (np.ascontiguousarray) instead`);
  }
  const shape = shapeText.split(',').map((s) => s.trim()).filter((s) => s !== '').map(Number);
  if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new ClientError(`${path}: bad shape (${shapeText}) in its .npy header`);
  }
  const count = shape.reduce((a, b) => a * b, 1);
  const bytes = count * ITEM_SIZE[descr];
  if (buffer.length - start < bytes) {
    throw new ClientError(`${path} is truncated: its header promises ${bytes} bytes of data, it has ` +
      `${buffer.length - start}`);
  }
  // Copied out: the data offset need not be 4-byte aligned for a Float32Array view.
  const raw = buffer.buffer.slice(buffer.byteOffset + start, buffer.byteOffset + start + bytes);
  return { descr, shape, data: descr === '<f4' ? new Float32Array(raw) : new Uint8Array(raw) };
}

/** A Float32Array of `shape` as the bytes of a version-1 little-endian float32 C-order .npy file. */
function npyBytes(data, shape) {
  const tuple = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(', ')})`;
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': ${tuple}, }`;
  // Magic (6) + version (2) + length (2) + header + '\n' is padded with spaces to a multiple of 64 bytes.
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n';
  const prefix = Buffer.alloc(10);
  MAGIC.copy(prefix);
  prefix[6] = 1;
  prefix.writeUInt16LE(header.length, 8);
  const body = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return Buffer.concat([prefix, Buffer.from(header, 'latin1'), body]);
}

if (os.endianness() !== 'LE') {
  // Float32Array uses the machine's byte order; the files are little-endian.
  throw new Error('this .npy reader/writer runs on little-endian machines only');
}

module.exports = { readNpy, npyBytes };
