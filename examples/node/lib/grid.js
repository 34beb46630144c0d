'use strict';
// Image grids as fastvae.files.image_grid lays them out (torchvision's make_grid): `nrow` images per row,
// 2 px white padding, values in [0, 1] rounded to uint8; grayscale (C = 1) or RGB (C = 3) PNGs via pngjs.

const { PNG } = require('pngjs');

/** Images (N * C * H * W float, row-major) -> { width, height, channels, pixels: Uint8Array (H', W', C) }. */
function imageGrid(images, [n, channels, height, width], nrow, padding = 2) {
  const cols = Math.min(nrow, n);
  const rows = Math.ceil(n / nrow);
  const gridHeight = rows * (height + padding) + padding;
  const gridWidth = cols * (width + padding) + padding;
  const pixels = new Uint8Array(gridHeight * gridWidth * channels).fill(255); // white padding
  const plane = height * width;
  for (let i = 0; i < n; i++) {
    const top = padding + Math.floor(i / nrow) * (height + padding);
    const left = padding + (i % nrow) * (width + padding);
    for (let c = 0; c < channels; c++) {
      const source = (i * channels + c) * plane;
      for (let y = 0; y < height; y++) {
        for (let x = 0; x < width; x++) {
          const value = Math.min(Math.max(images[source + y * width + x], 0), 1);
          pixels[((top + y) * gridWidth + left + x) * channels + c] = Math.round(value * 255);
        }
      }
    }
  }
  return { width: gridWidth, height: gridHeight, channels, pixels };
}

/** The PNG file bytes of a grid from imageGrid: 8-bit grayscale or RGB, no alpha. */
function pngBytes({ width, height, channels, pixels }) {
  if (channels !== 1 && channels !== 3) throw new Error(`a PNG grid needs 1 or 3 channels, got ${channels}`);
  const colorType = channels === 1 ? 0 : 2;
  const png = new PNG({ width, height, colorType, inputColorType: colorType, inputHasAlpha: false, bitDepth: 8 });
  png.data = Buffer.from(pixels.buffer, pixels.byteOffset, pixels.byteLength);
  return PNG.sync.write(png, { colorType, inputColorType: colorType, inputHasAlpha: false });
}

module.exports = { imageGrid, pngBytes };
