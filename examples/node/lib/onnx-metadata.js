'use strict';
// Reads an ONNX file's metadata_props without a protobuf library: onnxruntime-node 1.30 exposes the graph's
// input/output metadata but not the model's custom metadata map (onnxruntime's Python API has it).

const { ClientError } = require('./errors');

const METADATA_PROPS = 14; // ModelProto.metadata_props: repeated StringStringEntryProto { key = 1; value = 2; }
const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Protobuf wire-format reader over one message's bytes; every read is bounds-checked. */
class Reader {
  constructor(bytes, name) {
    this.bytes = bytes;
    this.pos = 0;
    this.name = name;
  }

  fail(what) {
    throw new ClientError(`${this.name} is not a loadable ONNX model (corrupt, truncated or not ONNX): ${what}`);
  }

  varint() {
    // Arithmetic, not bit operations: lengths beyond 2^31 must not wrap.
    let value = 0;
    for (let shift = 0; shift < 64; shift += 7) {
      if (this.pos >= this.bytes.length) this.fail('it ends inside a number');
      const byte = this.bytes[this.pos++];
      value += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return value;
    }
    return this.fail('a number longer than 10 bytes');
  }

  skip(count) {
    if (count > this.bytes.length - this.pos) this.fail(`it ends ${count - (this.bytes.length - this.pos)} bytes early`);
    const start = this.pos;
    this.pos += count;
    return this.bytes.subarray(start, this.pos);
  }

  /** The next (field number, wire type, value): a number for varints, bytes for the others. */
  field() {
    const tag = this.varint();
    const number = Math.floor(tag / 8);
    const wire = tag % 8;
    if (number === 0) this.fail('field number 0');
    if (wire === 0) return [number, wire, this.varint()];
    if (wire === 1) return [number, wire, this.skip(8)];
    if (wire === 2) return [number, wire, this.skip(this.varint())];
    if (wire === 5) return [number, wire, this.skip(4)];
    return this.fail(`wire type ${wire}, which ONNX files do not use`);
  }

  done() {
    return this.pos >= this.bytes.length;
  }
}

/** The metadata_props of the ONNX ModelProto in `bytes` (a Uint8Array) as a Map of strings. The whole top level
 * is walked, so a file cut short anywhere outside the graph's own bytes is caught here. */
function readMetadataProps(bytes, name) {
  const model = new Reader(bytes, name);
  const props = new Map();
  while (!model.done()) {
    const [number, wire, value] = model.field();
    if (number !== METADATA_PROPS) continue;
    if (wire !== 2) model.fail('metadata_props is not a message');
    const entry = new Reader(value, name);
    let key = '';
    let text = '';
    while (!entry.done()) {
      const [field, kind, data] = entry.field();
      if (kind !== 2 || (field !== 1 && field !== 2)) continue;
      let decoded;
      try {
        decoded = utf8.decode(data);
      } catch {
        model.fail('a metadata string that is not UTF-8');
      }
      if (field === 1) key = decoded;
      else text = decoded;
    }
    props.set(key, text);
  }
  return props;
}

module.exports = { readMetadataProps };
