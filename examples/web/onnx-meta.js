// The ONNX file's metadata_props (key -> value strings), read straight from its protobuf bytes: onnxruntime-web
// 1.30 exposes the graph's input and output shapes but not the model's custom metadata, which fastvae's export
// writes its contract into (fastvae.part, fastvae.z_dim, fastvae.image_shape).

// Field numbers from onnx/onnx.proto: ModelProto.metadata_props = 14; StringStringEntryProto key = 1, value = 2.
const METADATA_PROPS = 14, KEY = 1, VALUE = 2;
const utf8 = new TextDecoder("utf-8", { fatal: true });

export class NotOnnxError extends Error {}

/** Map<string, string> of a serialized ModelProto's metadata_props. The graph (field 7, nearly all the bytes)
 * is skipped by its length, never parsed. Throws NotOnnxError for bytes that are not a protobuf message. */
export function readMetadata(bytes) {
  const meta = new Map();
  for (const [field, value] of fields(bytes)) {
    if (field !== METADATA_PROPS || !(value instanceof Uint8Array)) continue;
    let key = "", text = "";
    for (const [f, v] of fields(value)) {
      if (f === KEY && v instanceof Uint8Array) key = decode(v);
      if (f === VALUE && v instanceof Uint8Array) text = decode(v);
    }
    meta.set(key, text);
  }
  return meta;
}

function decode(bytes) {
  try {
    return utf8.decode(bytes);
  } catch {
    throw new NotOnnxError("its metadata holds a string that is not UTF-8 (a damaged file)");
  }
}

/** Yields [field number, value] for each field of one protobuf message: a Number for varints, a Uint8Array
 * view for length-delimited fields; fixed 32- and 64-bit fields are skipped. */
function* fields(bytes) {
  let pos = 0;
  const varint = () => {
    let result = 0;
    for (let shift = 0; shift < 64; shift += 7) {
      if (pos >= bytes.length) throw new NotOnnxError("it ends inside a protobuf varint (truncated?)");
      const byte = bytes[pos++];
      result += (byte & 0x7f) * 2 ** shift; // multiply, not <<: JavaScript's shifts are 32-bit
      if (byte < 0x80) return result;
    }
    throw new NotOnnxError("it holds a protobuf varint longer than 10 bytes");
  };
  const skip = (n) => {
    if (pos + n > bytes.length) throw new NotOnnxError("a protobuf field runs past its end (truncated?)");
    pos += n;
  };
  while (pos < bytes.length) {
    const tag = varint();
    const field = Math.floor(tag / 8), wire = tag % 8;
    if (field === 0) throw new NotOnnxError("it holds protobuf field number 0");
    if (wire === 0) yield [field, varint()];
    else if (wire === 1) skip(8);
    else if (wire === 5) skip(4);
    else if (wire === 2) {
      const length = varint(), start = pos;
      skip(length);
      yield [field, bytes.subarray(start, pos)];
    } else throw new NotOnnxError(`it holds protobuf wire type ${wire}, which ONNX files never use`);
  }
}
