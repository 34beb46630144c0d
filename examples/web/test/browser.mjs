// Drives the page in headless Chromium for tests/test_web.py (puppeteer-core, the system's browser):
//   node examples/web/test/browser.mjs URL INPUT.json OUT_DIR
// INPUT.json holds {"z": [...], "n": n}: latents the page decodes through window.fastvae. Writes OUT_DIR/page.png
// and OUT_DIR/result.json (what the page reported, console errors, the origins it contacted), then exits 0; the
// Python test makes the assertions. Not served by fastvae serve-web (only the page's top-level files are).

import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import puppeteer from "puppeteer-core";

const [url, input, out] = process.argv.slice(2);
const { z, n } = JSON.parse(await readFile(input, "utf8"));
const TIMEOUT = 30_000;
const result = { errors: [], warnings: [], origins: [] };
const origins = new Set();

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  userDataDir: join(out, "chromium-profile"), // new and empty: nothing from an earlier run
  args: [
    ...(process.getuid?.() === 0 ? ["--no-sandbox"] : []), // Chromium refuses to run as root with its sandbox
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", // no name resolves: loopback traffic only
  ],
});
const page = await browser.newPage();
try {
  await page.setViewport({ width: 1000, height: 900 });
  page.on("console", (m) => {
    if (m.type() === "error") result.errors.push(`console: ${m.text()}`);
    if (m.type() === "warn") result.warnings.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => result.errors.push(`uncaught: ${e.message}`));
  page.on("requestfailed", (r) => result.errors.push(`request failed: ${r.url()} (${r.failure()?.errorText})`));
  page.on("response", (r) => r.status() >= 400 && result.errors.push(`HTTP ${r.status()}: ${r.url()}`));
  page.on("request", (r) => r.url().startsWith("http") && origins.add(new URL(r.url()).origin));
  page.setDefaultTimeout(TIMEOUT);

  const loaded = performance.now();
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => window.fastvae);
  result.info = await page.evaluate((ms) => Promise.race([window.fastvae.ready, new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`fastvae.ready not resolved after ${ms} ms`)), ms))]), TIMEOUT);
  result.readyMs = performance.now() - loaded;
  result.decoded = await page.evaluate(async (z, n) => Array.from(await window.fastvae.decode(new Float32Array(z), n)), z, n);

  // A real click on the first slider, far from its current value, then the latent canvas before and after.
  const pixels = () => page.$eval("#latent", (c) => Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data));
  const before = await pixels(), renders = await page.evaluate(() => window.fastvae.renders);
  const slider = await page.$("#z0"), box = await slider.boundingBox();
  const start = Number(await slider.evaluate((s) => s.value));
  await page.mouse.click(box.x + box.width * (start > 0 ? 0.05 : 0.95), box.y + box.height / 2);
  await page.waitForFunction((r) => window.fastvae.renders > r, {}, renders);
  const after = await pixels();
  result.slider = { from: start, to: Number(await slider.evaluate((s) => s.value)) };
  result.sliderChangedImage = before.some((v, i) => v !== after[i]);
  result.ms = await page.evaluate(() => Object.fromEntries(
    [...document.querySelectorAll("[id^=ms-]")].map((e) => [e.id.slice(3), Number(e.dataset.ms)])));
  result.timingText = await page.$eval("#timing", (e) => e.textContent);
  await page.screenshot({ path: join(out, "page.png"), fullPage: true });
} catch (e) {
  result.failure = String(e);
  result.status = await page.$eval("#status", (e) => e.textContent).catch(() => null);
} finally {
  result.origins = [...origins];
  await browser.close();
  await writeFile(join(out, "result.json"), JSON.stringify(result));
}
