// Shared set-up of the browser tests: the static server on a free loopback port, headless Chromium
// with WebGPU (flags from shared/FACTS.md) driven by playwright-core, and console-error capture.
import { mkdtempSync, readFileSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';
import { serve } from '../../scripts/serve.mjs';

export const root = resolve(import.meta.dirname, '../..');
export const artifacts = join(root, 'test-results');

export async function start() {
  const server = await serve(0);
  const base = `http://127.0.0.1:${server.address().port}`;
  const profile = mkdtempSync(join(tmpdir(), 'webgpu-lora-chromium-'));
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--enable-unsafe-webgpu', '--no-sandbox', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic',
    ],
  });
  const errors = [];
  const expected404 = [];
  const page = browser.pages()[0] ?? (await browser.newPage());
  // A model directory's optional files (an index, a chat template, ...) are probed and may be
  // absent: the browser logs those 404s as errors, which are expected and not counted.
  const optional = /\/(model\.safetensors\.index\.json|chat_template\.jinja|tokenizer\.json|tokenizer_config\.json|generation_config\.json)$/;
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    if (/status of 404/.test(m.text()) && (optional.test(m.location().url) || expected404.some((u) => m.location().url.endsWith(u)))) return;
    errors.push(`${m.text()} (${m.location().url})`);
  });
  page.on('pageerror', (e) => errors.push(String(e)));
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
  const bytes = readFileSync(path);
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
