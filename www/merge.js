// The Merge panel: merge the active adapter, compare the merged model with the adapter (max logit
// difference on a probe prompt), download the merged model as a Hugging Face directory or as one
// GGUF for llama.cpp, Ollama, LM Studio and wllama.
import { $, offerDownloads, statusLine } from './ui.js';

const PROBE = 'Tell me about LoRA.';

export function setupMerge(app) {
  const say = statusLine('merge-status');
  const probeIds = async () => {
    // the probe prompt's ids: the first tokens the chat template and a generation give back
    const stream = app.model.generate(PROBE, { maxNewTokens: 1 });
    for await (const _ of stream);
    return (await stream.result).promptIds;
  };

  $('merge-button').addEventListener('click', async () => {
    const name = app.model.activeAdapter;
    try {
      const ids = await probeIds();
      const before = (await app.model.logits(ids)).data;
      await app.model.mergeAdapter([name], { safeMerge: true });
      const after = (await app.model.logits(ids)).data;
      let diff = 0;
      for (let i = 0; i < before.length; i++) diff = Math.max(diff, Math.abs(before[i] - after[i]));
      $('merge-status').dataset.maxDiff = String(diff);
      const verdict = diff < 1e-3 ? '(matches within 1e-3)' : '(larger than 1e-3: a quantized base is requantized by the merge, so differences of its rounding are expected)';
      say(`Merged "${name}" into the base weights. Max |merged - adapter| logit difference over ${before.length.toLocaleString('en')} logits: ${diff.toExponential(2)} ${verdict}.`);
      $('download-button').disabled = false;
      $('download-gguf-button').disabled = false;
      $('merge-button').disabled = true;
    } catch (e) {
      say(`Merge failed: ${e.message}`, true);
    }
  });

  $('download-gguf-button').addEventListener('click', async () => {
    try {
      say('Writing the merged model as a GGUF…');
      const files = await app.model.exportMerged({ format: 'gguf' });
      offerDownloads(files, $('merge-files'), 'A GGUF for llama.cpp (-m), Ollama (FROM), LM Studio and wllama');
      say('The merged GGUF is ready.');
    } catch (e) {
      say(`GGUF export failed: ${e.message}`, true);
    }
  });

  $('download-button').addEventListener('click', async () => {
    try {
      say('Preparing the merged model…');
      const files = await app.model.exportMerged();
      offerDownloads(files, $('merge-files'), 'Save each file into one folder (a Hugging Face model directory)');
      say('The merged model is ready.');
    } catch (e) {
      say(`Download failed: ${e.message}`, true);
    }
  });
}
