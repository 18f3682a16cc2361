// The Train panel: data (a file or the sample dataset) with a preview, LoRA and training settings
// with the live trainable-parameter count (or the active adapter, trained further), Start/Cancel, the loss chart, progress, and the result
// saved to IndexedDB. A run keeps its latest checkpoint in IndexedDB as it goes; after a closed
// tab (or a crash) the next visit offers to resume it.
import { LossChart } from './chart.js';
import { $ } from './ui.js';

export function setupTraining(app) {
  const chart = new LossChart($('loss-chart'));
  app.chart = chart;
  let data = null; // {name, text, validation}
  let controller = null;
  // the run's latest checkpoint, kept under this name with the job that restarts it
  const CHECKPOINT = 'playground-run';
  let kept = null; // {step, job, files}

  const loraConfig = () => ({
    r: Number($('lora-r').value),
    loraAlpha: Number($('lora-alpha').value),
    loraDropout: Number($('lora-dropout').value),
    targetModules: $('lora-targets').value.split(','),
    initLoraWeights: $('lora-init').value,
    useRslora: $('lora-rslora').checked,
  });

  async function updateCount() {
    if (!app.model) return void ($('param-count').textContent = 'Load a model to see how many parameters train.');
    try {
      const { trainable, all } = await app.model.loraParameterCount(loraConfig());
      $('param-count').textContent = `trainable params: ${trainable.toLocaleString('en')} || all params: ${all.toLocaleString('en')} || trainable%: ${(100 * trainable / all).toFixed(4)}`;
    } catch (e) {
      $('param-count').textContent = e.message;
    }
  }
  for (const id of ['lora-r', 'lora-targets', 'lora-rslora', 'lora-alpha']) $(id).addEventListener('input', updateCount);
  // continuing an adapter trains it with its own settings
  const continuing = () => $('lora-continue').checked;
  $('lora-continue').addEventListener('change', () => {
    for (const id of ['lora-r', 'lora-alpha', 'lora-dropout', 'lora-targets', 'lora-init', 'lora-rslora']) $(id).disabled = continuing();
  });
  app.onModel.push(() => { updateCount(); refreshButton(); });
  // DPO's two passes over a batch must see one adapter: no dropout; its beta applies
  $('train-method').addEventListener('change', () => {
    const dpo = $('train-method').value === 'dpo';
    $('train-beta').disabled = !dpo;
    if (dpo) $('lora-dropout').value = '0';
  });

  function showData(name, text, validation = null) {
    const lines = text.split('\n').filter((l) => l.trim());
    data = { name, text, validation };
    $('data-status').textContent = `${name}: ${lines.length} examples${validation ? ` + ${validation.split('\n').filter((l) => l.trim()).length} for validation` : ''}.`;
    $('data-preview').textContent = lines.slice(0, 3).map((l) => (l.length > 300 ? l.slice(0, 300) + '…' : l)).join('\n');
    refreshButton();
  }

  $('train-file').addEventListener('change', async () => {
    const file = $('train-file').files[0];
    if (file) showData(file.name, await file.text());
  });
  $('sample-button').addEventListener('click', async () => {
    try {
      // DPO's pairs; chat examples for a model with a chat template, prompt/completion pairs otherwise
      const dpo = $('train-method').value === 'dpo';
      const folder = dpo ? 'robot-preferences' : app.model && !app.model.hasChatTemplate ? 'robot-completions' : 'robot';
      const get = async (f) => {
        const r = await fetch(new URL(`data/${folder}/${f}`, location.href));
        if (!r.ok) throw new Error(`data/${folder}/${f}: HTTP ${r.status}`);
        return r.text();
      };
      showData(`${folder}/train.jsonl`, await get('train.jsonl'), await get('val.jsonl'));
    } catch (e) {
      $('data-status').textContent = `Could not fetch the sample dataset: ${e.message}`;
    }
  });

  function refreshButton() {
    $('train-button').disabled = !(app.model && data) || controller !== null;
    $('resume-button').hidden = !kept;
    $('resume-button').disabled = !(app.model && kept) || controller !== null;
    if (kept) $('resume-button').textContent = `Resume "${kept.job.name}" from step ${kept.step} of ${kept.job.trainingArgs.maxSteps}`;
  }
  app.store?.getCheckpoint(CHECKPOINT).then((k) => { kept = k; refreshButton(); }, () => {});

  $('train-button').addEventListener('click', async () => {
    const active = app.model.activeAdapter;
    if (continuing() && !active) {
      $('train-status').textContent = 'Training failed: no adapter is active to continue from: use one from the table first';
      return $('train-status').classList.add('error');
    }
    const maxSteps = Number($('train-steps').value);
    const dpo = $('train-method').value === 'dpo';
    const job = {
      name: $('train-name').value.trim() || 'my-adapter',
      data,
      ...(continuing() ? { initFrom: await app.model.exportAdapter(active) } : { loraConfig: loraConfig() }),
      trainingArgs: {
        lr: Number($('train-lr').value), maxSteps, batchSize: Number($('train-batch').value),
        evalEvery: Number($('train-eval').value), maxSeqLen: Number($('train-seq').value),
        ...(dpo ? { method: 'dpo', beta: Number($('train-beta').value) } : {}),
        // DPO takes a validation file of pairs only (the sample has one)
        ...(data.validation || dpo ? {} : { valSplit: Number($('train-val').value) || undefined }),
        truncate: true,
        gradientCheckpointing: $('train-checkpointing').checked,
        checkpointEvery: Math.max(1, Math.ceil(maxSteps / 10)),
      },
    };
    await run(job);
  });
  $('resume-button').addEventListener('click', () => run(kept.job, kept));

  // Trains `job` ({name, data, loraConfig | initFrom, trainingArgs}), from the checkpoint `from`
  // when given; keeps each checkpoint in IndexedDB until the run ends.
  async function run(job, from = null) {
    const { name, data, trainingArgs } = job;
    const maxSteps = trainingArgs.maxSteps;
    controller = new AbortController();
    refreshButton();
    $('cancel-button').disabled = false;
    chart.reset();
    const progress = $('train-progress');
    progress.max = maxSteps;
    progress.value = from?.step ?? 0;
    $('train-status').textContent = from ? `Resuming "${name}" from step ${from.step}…` : 'Preparing the data…';
    $('train-status').classList.remove('error');
    let keeping = Promise.resolve();
    try {
      const report = await app.model.train({
        data: data.text,
        validation: data.validation,
        dataName: data.name,
        adapterName: name,
        ...(from ? { resumeFrom: from.files } : job.initFrom ? { initFrom: job.initFrom } : { loraConfig: job.loraConfig }),
        trainingArgs,
        onCheckpoint: (files) => {
          // the store keeps saves in call order: the last one settles after those before it
          keeping = Promise.resolve(app.store?.saveCheckpoint(CHECKPOINT, files, job)).catch((e) => {
            $('train-status').textContent = `Could not keep a checkpoint: ${e.message}`;
          });
        },
        onStep: (m) => {
          chart.add('train', m.step, m.loss);
          progress.value = m.step;
          const rewards = m.rewards ? ` · reward margin ${m.rewards.margins.toFixed(3)}, chosen preferred in ${(100 * m.rewards.accuracies).toFixed(0)}% of pairs` : '';
          $('train-status').textContent = `step ${m.step} of ${maxSteps} · loss ${m.loss.toFixed(3)}${rewards} · ${m.tokensPerS.toFixed(0)} tokens/s · about ${Math.ceil(m.etaS)} s left`;
        },
        onEval: (e) => chart.add('val', e.step, e.valLoss),
        signal: controller.signal,
      });
      await app.model.saveAdapter(name, { overwrite: true });
      await keeping;
      await app.store?.deleteCheckpoint(CHECKPOINT); // the adapter is saved: nothing to resume
      kept = null;
      const s = report.summary;
      $('train-status').textContent = `${s.end === 'completed' ? 'Done' : `Stopped (${s.end})`}: ${s.steps} steps, ${s.tokens} tokens, best validation loss ${s.bestValLoss?.toFixed(3) ?? '-'}. Saved as "${name}" and active.`;
      await app.refreshAdapters();
    } catch (e) {
      $('train-status').textContent = `Training failed: ${e.message}`;
      $('train-status').classList.add('error');
    } finally {
      controller = null;
      $('cancel-button').disabled = true;
      refreshButton();
    }
  }
  $('cancel-button').addEventListener('click', () => controller?.abort());
}
