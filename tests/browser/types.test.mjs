// lib/index.d.ts against what the package really hands out: a short session in headless Chromium
// (load with progress, train with every event, generate, evaluate, store and list the adapter) collects the
// objects the callbacks and promises deliver, and each is compared with its declared interface in
// both directions: no key the declaration lacks, and every required declared key present. The
// training options are checked the same way against the engine: each declared key is accepted on
// its own, and every key the engine accepts is declared.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import ts from 'typescript';
import { start, root } from './helpers.mjs';

/** The declared interfaces (and unions of object types): name -> [variant: [{name, optional, type}]]. */
function declarations() {
  const text = readFileSync(join(root, 'lib/index.d.ts'), 'utf8');
  const source = ts.createSourceFile('index.d.ts', text, ts.ScriptTarget.Latest, true);
  const members = (list) => list.filter(ts.isPropertySignature).map((m) => ({ name: m.name.text, optional: Boolean(m.questionToken), type: m.type.getText(source) }));
  const out = new Map();
  for (const s of source.statements) {
    if (ts.isInterfaceDeclaration(s)) out.set(s.name.text, [members(s.members)]);
    if (ts.isTypeAliasDeclaration(s) && ts.isUnionTypeNode(s.type)) {
      const variants = s.type.types.filter(ts.isTypeLiteralNode).map((t) => members(t.members));
      if (variants.length) out.set(s.name.text, variants);
    }
  }
  return out;
}

const declared = declarations();

/** What is wrong with `value` as a `type` (its best-fitting variant): missing and undeclared keys. */
function mismatch(type, value) {
  const variants = declared.get(type);
  assert.ok(variants, `index.d.ts declares ${type}`);
  const problems = variants.map((props) => {
    const names = new Set(props.map((p) => p.name));
    const missing = props.filter((p) => !p.optional && !(p.name in value)).map((p) => `${type} lacks ${p.name}`);
    const extra = Object.keys(value).filter((k) => !names.has(k)).map((k) => `${type} does not declare ${k}`);
    return [...missing, ...extra];
  });
  return problems.reduce((best, p) => (p.length < best.length ? p : best));
}

let b;
before(async () => { b = await start(); });
after(async () => { await b?.close(); });

test('index.d.ts declares exactly the keys of what a session emits', async () => {
  const data = readFileSync(join(root, 'data/robot/train.jsonl'), 'utf8').split('\n').slice(0, 8).join('\n');
  const got = await b.page.evaluate(async (data) => {
    const { LoraModel, AdapterStore } = window.app.webgpuLora;
    const progress = [];
    const m = await LoraModel.fromPretrained('/fixtures/tiny-chat/', { onProgress: (e) => progress.push(e), cache: false });
    const steps = [], evals = [], checkpoints = [];
    const report = await m.train({
      data, dataName: 'robot.jsonl', adapterName: 'typed',
      loraConfig: { r: 2, targetModules: ['q_proj'] },
      trainingArgs: { maxSteps: 2, batchSize: 2, evalEvery: 1, valSplit: 0.25, checkpointEvery: 1, learningRate: 1e-3 },
      onStep: (s) => steps.push(s), onEval: (e) => evals.push(e), onCheckpoint: (c) => checkpoints.push(c),
    });
    const stream = m.generate('Hi', { maxNewTokens: 2 });
    for await (const _ of stream);
    const generation = await stream.result;
    // robot.jsonl's lines are conversations: each has a reference answer
    const evaluation = await m.evaluate(data, { dataName: 'robot.jsonl', maxNewTokens: 2 });
    const stored = await m.saveAdapter('typed', { as: 'typed-check', overwrite: true });
    const store = await AdapterStore.open();
    const listed = (await store.list()).find((a) => a.name === 'typed-check');
    const { config, weights, ...got } = await store.get('typed-check');
    await store.delete('typed-check');
    store.close();
    m.dispose();
    // checkpoint files arrive as bytes: only their keys matter here
    return { progress, steps, evals, checkpoints: checkpoints.map((c) => Object.fromEntries(Object.keys(c).map((k) => [k, 0]))), report, generation, evaluation, stored, listed, got };
  }, data);

  const problems = [];
  const check = (type, value) => problems.push(...mismatch(type, value));
  assert.ok(got.progress.some((e) => e.stage === 'download') && got.progress.some((e) => e.stage === 'upload'));
  got.progress.forEach((e) => check('LoadProgress', e));
  assert.equal(got.steps.length, 2);
  got.steps.forEach((s) => check('StepMetrics', s));
  assert.ok(got.evals.length >= 2);
  got.evals.forEach((e) => check('EvalEvent', e));
  assert.equal(got.checkpoints.length, 1);
  check('CheckpointFiles', got.checkpoints[0]);
  check('TrainReport', got.report);
  check('TrainingSummary', got.report.summary);
  check('DataReport', got.report.trainData);
  check('DataReport', got.report.valData);
  check('GenerationResult', got.generation);
  check('Evaluation', got.evaluation);
  check('GenerationScores', got.evaluation.generation);
  assert.equal(got.evaluation.generation.pairs + got.evaluation.generation.skipped, 8, 'every conversation is a pair');
  for (const adapter of [got.stored, got.listed, got.got]) {
    check('StoredAdapter', adapter);
    check('BaseModel', adapter.baseModel);
    check('BaseShapes', adapter.baseModel.shapes);
    check('TrainingSummary', adapter.trainingSummary);
  }
  assert.deepEqual([...new Set(problems)], []);
  assert.deepEqual(b.errors, []);
});

test('every declared training option is accepted and every accepted option is declared', async () => {
  const options = ['LoraConfigOptions', 'TrainingArgs'].flatMap((t) => declared.get(t)[0]);
  const sample = (o) => {
    if (o.name === 'targetModules') return ['q_proj'];
    if (o.name === 'loraDropout' || o.name === 'valSplit') return 0.1;
    if (o.type.includes("'")) return o.type.split("'")[1]; // the first literal of a union
    return { boolean: true, string: 'x' }[o.type] ?? 2;
  };
  const result = await b.page.evaluate(async (options) => {
    const m = await window.app.webgpuLora.LoraModel.fromPretrained('/fixtures/tiny-llama/');
    const refused = [];
    for (const [name, value] of options) {
      await m.loraParameterCount({ [name]: value }).catch((e) => refused.push(`${name}: ${e.message}`));
    }
    const unknown = await m.loraParameterCount({ notAnOption: 1 }).then(() => null, (e) => e.message);
    m.dispose();
    return { refused, unknown };
  }, options.map((o) => [o.name, sample(o)]));
  assert.deepEqual(result.refused, []);
  // serde lists the fields it accepts (aliases aside): each must be declared (adapterName is train()'s own)
  const accepted = [...result.unknown.matchAll(/`(\w+)`/g)].map((m) => m[1]).filter((k) => k !== 'notAnOption');
  assert.ok(accepted.length > 20, result.unknown);
  const names = new Set([...options.map((o) => o.name), 'adapterName']);
  assert.deepEqual(accepted.filter((k) => !names.has(k)), [], 'options the engine accepts but index.d.ts does not declare');
  assert.deepEqual(b.errors, []);
});
