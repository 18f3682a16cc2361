// The playground: loads a model with the package's API (the engine runs in its worker) with a
// progress bar, streams chat answers, and wires the Train, Adapters and Merge panels. It uses the
// package's public API only.
import * as webgpuLora from './lib/index.js';
import { setupTraining } from './train.js';
import { setupAdapters } from './adapters.js';
import { setupMerge } from './merge.js';
import { $, formatBytes, statusLine } from './ui.js';

// for the end-to-end tests and the curious: the package's API, the loaded model, the store
const app = { webgpuLora, model: null, store: null, onModel: [], refreshAdapters: async () => {} };
window.app = app;
let stopper = null;

const setStatus = statusLine('load-status');

webgpuLora.webgpuStatus().then(({ available, message }) => {
  $('gpu-status').textContent = available ? 'WebGPU is available.' : message;
  $('gpu-status').classList.toggle('error', !available);
  $('load-button').disabled = !available;
});

// the model picker fills the URL and says what the model is; "Another URL" leaves the URL to type
function describeChoice() {
  const option = $('model-choice').selectedOptions[0];
  $('model-about').textContent = option.dataset.about;
  if (option.value) $('model-url').value = option.value;
  else $('model-url').focus();
}
$('model-choice').addEventListener('change', describeChoice);
describeChoice();

$('load-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const url = new URL($('model-url').value, location.href).href;
  const progress = $('load-progress');
  progress.hidden = false;
  progress.removeAttribute('value');
  $('load-button').disabled = true;
  const started = performance.now();
  try {
    app.model?.dispose();
    app.model = null;
    const model = await webgpuLora.LoraModel.fromPretrained(url, {
      dtype: $('model-dtype').value,
      onProgress(e) {
        if (e.stage === 'download') {
          const rate = e.loaded / ((performance.now() - started) / 1000);
          const eta = e.total > e.loaded ? Math.ceil((e.total - e.loaded) / rate) : 0;
          progress.max = e.total || 1;
          progress.value = e.loaded;
          setStatus(`Downloading ${e.file}${e.cached ? ' (cached)' : ''}: ${formatBytes(e.loaded)} of ${formatBytes(e.total)}, about ${eta} s left`);
        } else if (e.stage === 'upload') {
          progress.max = e.total;
          progress.value = e.done;
          setStatus(`Moving weights to the GPU: ${e.done} of ${e.total} tensors`);
        }
      },
    });
    app.model = model;
    const config = model.config;
    progress.max = 1;
    progress.value = 1;
    const footprint = formatBytes(await model.getMemoryFootprint());
    const dtype = $('model-dtype').value === 'auto' ? 'stored' : $('model-dtype').value;
    const chat = model.hasChatTemplate ? '' : ' It has no chat template: the chat continues your text as it is.';
    setStatus(`Loaded: ${config.num_hidden_layers} layers, hidden size ${config.hidden_size}, vocabulary ${config.vocab_size}, ${footprint} of ${dtype} weights on the GPU (${((performance.now() - started) / 1000).toFixed(1)} s).${chat}`);
    $('prompt').disabled = false;
    $('send-button').disabled = false;
    for (const f of app.onModel) await f();
    $('prompt').focus();
  } catch (e) {
    progress.hidden = true;
    setStatus(`Could not load the model: ${e.message}`, true);
  } finally {
    $('load-button').disabled = false;
  }
});

function addMessage(role, text) {
  const div = document.createElement('div');
  div.className = `message ${role}`;
  div.textContent = text;
  $('transcript').append(div);
  return div;
}

function options() {
  const num = (id) => Number($(id).value);
  return {
    chat: app.model.hasChatTemplate,
    maxNewTokens: num('max-new-tokens'),
    temperature: num('temperature'),
    topP: num('top-p'),
    topK: num('top-k'),
    repetitionPenalty: num('repetition-penalty'),
    seed: num('seed'),
  };
}

$('chat-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const prompt = $('prompt').value.trim();
  if (!prompt) return;
  addMessage('user', prompt);
  const answer = addMessage('assistant', '');
  answer.setAttribute('aria-busy', 'true');
  $('prompt').value = '';
  $('send-button').disabled = true;
  $('stop-button').disabled = false;
  stopper = new AbortController();
  try {
    const stream = app.model.generate(prompt, { ...options(), signal: stopper.signal });
    for await (const piece of stream) {
      answer.textContent += piece;
      $('transcript').scrollTop = $('transcript').scrollHeight;
    }
    const result = await stream.result;
    answer.dataset.tokens = JSON.stringify(result.tokens);
    answer.dataset.stopReason = result.stopReason;
  } catch (e) {
    answer.textContent += `\n[error: ${e.message}]`;
    answer.classList.add('error');
  } finally {
    answer.removeAttribute('aria-busy');
    $('send-button').disabled = false;
    $('stop-button').disabled = true;
  }
});

$('stop-button').addEventListener('click', () => stopper?.abort());
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); $('chat-form').requestSubmit(); }
});

try {
  app.store = await webgpuLora.AdapterStore.open();
} catch (e) {
  $('adapters-status').textContent = e.message;
}
setupTraining(app);
setupAdapters(app);
setupMerge(app);
await app.refreshAdapters();
for (const f of app.onModel) await f();
app.ready = true;
