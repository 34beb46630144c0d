// Pixels in and out: float images (n, C, H, W) in [0, 1] drawn as a grid on a canvas at one canvas pixel per
// image pixel (CSS scales it up, pixelated), and a user's picture turned into one such image.

const GAP = 1, GAP_GRAY = 48; // one dark pixel between tiles

/** Draw n images (Float32Array (n, C, H, W), C = 1 gray or 3 RGB) in `cols` columns on `canvas`, shown
 * `scale` times larger. */
export function drawGrid(canvas, images, n, [c, h, w], cols, scale) {
  cols = Math.min(cols, n);
  const rows = Math.ceil(n / cols);
  canvas.width = cols * w + (cols - 1) * GAP;
  canvas.height = rows * h + (rows - 1) * GAP;
  canvas.style.width = `${canvas.width * scale}px`;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const frame = context.createImageData(canvas.width, canvas.height);
  const px = frame.data; // RGBA, 0..255
  for (let i = 0; i < px.length; i += 4) px.set([GAP_GRAY, GAP_GRAY, GAP_GRAY, 255], i);
  const plane = h * w;
  for (let k = 0; k < n; k++) {
    const top = Math.floor(k / cols) * (h + GAP), left = (k % cols) * (w + GAP), image = k * c * plane;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const at = 4 * ((top + y) * canvas.width + left + x), src = image + y * w + x;
        for (let ch = 0; ch < 3; ch++) px[at + ch] = Math.round(255 * images[src + (c === 3 ? ch * plane : 0)]);
      }
    }
  }
  context.putImageData(frame, 0, 0);
}

/** A picture (ImageBitmap or image element) as one image Float32Array (1, C, H, W): its centred crop of the
 * model's aspect, scaled to H x W on a white background (for transparent PNGs), gray (Rec. 601 luma) if C = 1,
 * inverted if asked (Fashion-MNIST's items are light on black, most photos the other way round). */
export function pictureToImage(picture, [c, h, w], invert) {
  const canvas = new OffscreenCanvas(w, h);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const side = Math.min(picture.width / w, picture.height / h); // source pixels per model pixel
  const sw = side * w, sh = side * h;
  context.fillStyle = "white";
  context.fillRect(0, 0, w, h);
  context.imageSmoothingQuality = "high";
  context.drawImage(picture, (picture.width - sw) / 2, (picture.height - sh) / 2, sw, sh, 0, 0, w, h);
  const rgba = context.getImageData(0, 0, w, h).data;
  const image = new Float32Array(c * h * w), plane = h * w;
  for (let i = 0; i < plane; i++) {
    const [r, g, b] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]].map((v) => (invert ? 255 - v : v) / 255);
    if (c === 1) image[i] = 0.299 * r + 0.587 * g + 0.114 * b;
    else [image[i], image[plane + i], image[2 * plane + i]] = [r, g, b];
  }
  return image;
}
