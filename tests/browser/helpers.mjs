// Shared set-up of the browser tests: the static server on a free loopback port, headless Chromium
// with WebGPU (flags from shared/FACTS.md) driven by playwright-core, and console-error capture.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, mkdirSync } from 'node:fs';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';
import { serve } from '../../scripts/serve.mjs';

export const root = resolve(import.meta.dirname, '../..');
export const artifacts = join(root, 'test-results');

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

// Wall-clock limits are written for an idle 4-core machine and scaled here: a machine with fewer
// cores, or one already busy (1-minute load average above its cores), gets proportionally longer.
// WEBGPU_LORA_TIMEOUT_SCALE sets the factor instead.
const cores = availableParallelism();
const TIMEOUT_SCALE = Number(process.env.WEBGPU_LORA_TIMEOUT_SCALE) || Math.max(1, 4 / cores, (loadavg()[0] + 1) / cores);

/** `ms` (a limit on an idle 4-core machine) scaled for this one. */
export const limit = (ms) => Math.round(ms * TIMEOUT_SCALE);
const FLAGS = [
  '--enable-unsafe-webgpu', '--no-sandbox', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-quic',
  // a real GPU's flags, from bench/gpu.sh
  ...(process.env.WEBGPU_LORA_CHROMIUM_FLAGS ?? '').split(' ').filter(Boolean),
];

/**
 * Collects the page's console errors into `errors`. A model directory's optional files (an index,
 * a chat template, ...) are probed and may be absent: the browser logs those 404s as errors,
 * which are expected and not counted, as are 404s of URLs ending in one of `expected404`.
 */
export function watchConsole(page, errors, expected404 = []) {
  const optional = /\/(model\.safetensors\.index\.json|chat_template\.jinja|tokenizer\.json|tokenizer_config\.json|generation_config\.json)$/;
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    if (/status of 404/.test(m.text()) && (optional.test(m.location().url) || expected404.some((u) => m.location().url.endsWith(u)))) return;
    errors.push(`${m.text()} (${m.location().url})`);
  });
  page.on('pageerror', (e) => errors.push(String(e)));
}

/**
 * Starts headless Chromium as a child process of ours on `profile` (kept between launches) and
 * connects to it, so a test can relaunch on the same profile or SIGKILL the browser.
 * Resolves to {page, kill(), close()}.
 */
export async function launchChromium(profile) {
  const portFile = join(profile, 'DevToolsActivePort');
  rmSync(portFile, { force: true });
  const proc = spawn(CHROMIUM, [...FLAGS, '--headless=new', `--user-data-dir=${profile}`, '--remote-debugging-port=0', 'about:blank'], { stdio: 'ignore' });
  const exited = new Promise((ok) => proc.once('exit', ok));
  const deadline = Date.now() + limit(15_000);
  while (!existsSync(portFile) || !readFileSync(portFile, 'utf8').includes('\n')) {
    if (Date.now() > deadline || proc.exitCode !== null) throw new Error(`chromium did not start within ${limit(15_000) / 1000} s (exit code ${proc.exitCode})`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const port = readFileSync(portFile, 'utf8').split('\n')[0];
  const browser = await chromium.connectOverCDP(`http://127.0.0.1:${port}`, { timeout: limit(30_000) });
  const context = browser.contexts()[0];
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(limit(30_000));
  return {
    page,
    /** SIGKILL: no shutdown of any kind. */
    async kill() { proc.kill('SIGKILL'); await exited; },
    /** A normal quit, as closing the window. */
    async close() {
      await (await browser.newBrowserCDPSession()).send('Browser.close').catch(() => {});
      await exited;
    },
  };
}

/**
 * The static server and a browser profile kept between launches, for tests that quit, kill and
 * relaunch the browser: {origin, errors, open(), close()}. open() starts Chromium on the profile
 * with the demo page loaded; close() stops the server and deletes the profile. `mounts` as serve's
 * (default: scripts/serve.mjs's).
 */
export async function relaunchable({ mounts } = {}) {
  const server = await serve(0, '127.0.0.1', mounts);
  const origin = `http://127.0.0.1:${server.address().port}`;
  const profile = mkdtempSync(join(tmpdir(), 'webgpu-lora-profile-'));
  const errors = [];
  return {
    origin,
    errors,
    async open() {
      const browser = await launchChromium(profile);
      watchConsole(browser.page, errors);
      await browser.page.goto(`${origin}/`);
      return browser;
    },
    close() {
      server.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/**
 * The static server (default: scripts/serve.mjs's mounts) and headless Chromium on its page;
 * `webgpu: false` starts it as Chromium on Linux comes by default: navigator.gpu without an adapter.
 */
export async function start({ mounts, webgpu = true } = {}) {
  const server = await serve(0, '127.0.0.1', mounts);
  const base = `http://127.0.0.1:${server.address().port}`;
  const profile = mkdtempSync(join(tmpdir(), 'webgpu-lora-chromium-'));
  const args = webgpu ? FLAGS : FLAGS.filter((f) => f !== '--enable-unsafe-webgpu');
  const browser = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, headless: true, args, timeout: limit(30_000) });
  const errors = [];
  const expected404 = [];
  const page = browser.pages()[0] ?? (await browser.newPage());
  page.setDefaultTimeout(limit(30_000));
  watchConsole(page, errors, expected404);
  await page.goto(`${base}/`);
  const b = {
    base, page, errors,
    /** URL suffixes a test requests knowing they are missing. */
    expected404,
    async screenshot(name) {
      mkdirSync(artifacts, { recursive: true });
      await page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });
    },
    async close() {
      await browser.close();
      server.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
  return b;
}

/** The f32 tensors of a safetensors file, by name: {shape, data: Float32Array}. */
export function readSafetensors(path) {
  return readSafetensorsBytes(readFileSync(path), path);
}

/** The F32 tensors of safetensors bytes (a Buffer): {name: {shape, data}}. */
export function readSafetensorsBytes(bytes, path = 'safetensors bytes') {
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8'));
  const out = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    if (info.dtype !== 'F32') throw new Error(`${path}: ${name} is ${info.dtype}, expected F32`);
    const [start, end] = info.data_offsets;
    const slice = bytes.subarray(8 + headerLength + start, 8 + headerLength + end);
    out[name] = { shape: info.shape, data: new Float32Array(slice.buffer.slice(slice.byteOffset, slice.byteOffset + slice.byteLength)) };
  }
  return out;
}

export function readJson(path) {
  return JSON.parse(readFileSync(path, 'utf8'));
}

/** max |a[i] - b[i]| (Infinity when the lengths differ). */
export function maxAbsDiff(a, b) {
  if (a.length !== b.length) return Infinity;
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
}
