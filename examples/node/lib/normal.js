'use strict';
// Seeded standard normals: mulberry32 (a public-domain 32-bit PRNG by Tommy Ettinger) and the Box-Muller
// transform. Deterministic for a seed, on every platform; NOT numpy's Generator, so `fastvae sample --seed 0`
// and `node sample.js --seed 0` draw different latents (pass the same latents with --z to compare).

/** A function returning uniforms in (0, 1], 32 bits each, from the integer `seed` (taken modulo 2^32). */
function mulberry32(seed) {
  let state = Number(BigInt.asUintN(32, BigInt(seed)));
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 1) / 4294967296; // + 1: never 0, so log() below is finite
  };
}

/** `count` standard normals as a Float32Array, in pairs from Box-Muller: sqrt(-2 ln u1) * (cos, sin)(2 pi u2). */
function standardNormal(count, seed) {
  const uniform = mulberry32(seed);
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const radius = Math.sqrt(-2 * Math.log(uniform()));
    const angle = 2 * Math.PI * uniform();
    out[i] = radius * Math.cos(angle);
    if (i + 1 < count) out[i + 1] = radius * Math.sin(angle);
  }
  return out;
}

module.exports = { standardNormal };
