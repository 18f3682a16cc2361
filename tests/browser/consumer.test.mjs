// The npm package as a user gets it: `npm pack`, installed from the tarball into a scratch Vite +
// TypeScript app, type-checked against lib/index.d.ts, built with `vite build`, served as plain
// files and run in headless Chromium: the tiny model's logits equal transformers' (1e-4).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { start, root, readJson, readSafetensors, maxAbsDiff, limit } from './helpers.mjs';

const scratch = mkdtempSync(join(tmpdir(), 'webgpu-lora-consumer-'));
let b;
after(async () => {
  await b?.close();
  rmSync(scratch, { recursive: true, force: true });
});

const run = (cmd, args, cwd) => execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

test('npm pack -> a Vite + TypeScript app -> logits in Chromium', async () => {
  const tarball = join(scratch, run('npm', ['pack', '--silent', '--pack-destination', scratch], root).trim().split('\n').pop());
  const app = join(scratch, 'app');
  execFileSync('mkdir', ['-p', app]);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module', dependencies: { 'webgpu-lora': `file:${tarball}` } }));
  writeFileSync(join(app, 'index.html'), '<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,"><script type="module" src="/main.ts"></script></head><body></body></html>');
  writeFileSync(join(app, 'main.ts'), `
import { LoraModel, AdapterStore, type StoredAdapter } from 'webgpu-lora';

async function main(): Promise<void> {
  const model: LoraModel = await LoraModel.fromPretrained('/fixtures/tiny-llama/', { onProgress: (e) => { if (e.stage === 'download') console.log(e.file, e.loaded, e.total); } });
  const { data, dims } = await model.logits(new Int32Array(${JSON.stringify(readJson(join(root, 'tests/fixtures/tiny-llama/expected.json')).ids)}));
  const stored: StoredAdapter[] = await (await AdapterStore.open()).list();
  (window as unknown as { result: unknown }).result = { dims, data: Array.from(data), stored: stored.length };
}
main().catch((e: Error) => { (window as unknown as { result: unknown }).result = { error: e.message }; });
`);
  // Vite bundles the package's module worker as an ES module
  writeFileSync(join(app, 'vite.config.js'), "export default { worker: { format: 'es' }, build: { target: 'es2022' } };\n");
  writeFileSync(join(app, 'tsconfig.json'), JSON.stringify({ compilerOptions: { target: 'es2022', module: 'esnext', moduleResolution: 'bundler', strict: true, lib: ['es2022', 'dom'], noEmit: true }, files: ['main.ts'] }));

  run('npm', ['install', '--offline', '--no-audit', '--no-fund'], app);
  run(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', app], app);
  run(process.execPath, [join(root, 'node_modules/vite/bin/vite.js'), 'build', '--logLevel', 'warn'], app);
  const assets = readdirSync(join(app, 'dist', 'assets'));
  assert.ok(assets.some((f) => f.endsWith('.wasm')), `the wasm is in the build: ${assets}`);

  b = await start({ mounts: [['/fixtures/', join(root, 'tests', 'fixtures')], ['/', join(app, 'dist')]] });
  const result = await b.page.waitForFunction(() => window.result, null, { timeout: limit(120_000) }).then((h) => h.jsonValue());
  assert.equal(result.error, undefined);
  const expected = readSafetensors(join(root, 'tests/fixtures/tiny-llama/expected.safetensors')).logits.data;
  assert.deepEqual(result.dims, [12, 256]);
  assert.ok(maxAbsDiff(result.data, expected) < 1e-4, `max |ours - transformers| = ${maxAbsDiff(result.data, expected)}`);
  assert.equal(result.stored, 0);
  assert.deepEqual(b.errors, []);
  assert.ok(existsSync(tarball));
});
