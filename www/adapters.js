// The Adapters panel: the adapters stored in IndexedDB with their metadata; use (load + set
// active), delete, rename, export; import PEFT files by drag and drop or a file picker; disable
// and enable; base vs adapter answers side by side.
import { $, formatBytes, offerDownloads, statusLine } from './ui.js';

export function setupAdapters(app) {
  const say = statusLine('adapters-status');
  const guard = (f) => async (...args) => {
    try { await f(...args); } catch (e) { say(e.message, true); }
  };

  async function use(name) {
    if (!app.model.adapters().includes(name)) await app.model.loadAdapter(name);
    await app.model.setAdapter(name);
    await app.model.enableAdapter();
    say(`"${name}" is active.`);
    await app.refreshAdapters();
  }

  app.refreshAdapters = async () => {
    const list = await app.store.list();
    const body = $('adapter-table').querySelector('tbody');
    body.replaceChildren();
    for (const a of list) {
      const row = document.createElement('tr');
      row.dataset.name = a.name;
      if (app.model?.activeAdapter === a.name) row.classList.add('active');
      const targets = Array.isArray(a.targetModules) ? a.targetModules.join(', ') : String(a.targetModules);
      for (const text of [a.name, a.baseModel?.name ?? '?', a.r, targets, formatBytes(a.size), new Date(a.created).toLocaleString(), a.trainingSummary?.finalLoss?.toFixed(3) ?? '-']) {
        const td = document.createElement('td');
        td.textContent = text;
        row.append(td);
      }
      const actions = document.createElement('td');
      const button = (label, f, needsModel = false) => {
        const b = document.createElement('button');
        b.type = 'button';
        b.textContent = label;
        b.dataset.action = label.toLowerCase();
        b.disabled = needsModel && !app.model;
        b.setAttribute('aria-label', `${label} ${a.name}`);
        b.addEventListener('click', guard(f));
        actions.append(b);
      };
      button('Use', () => use(a.name), true);
      button('Rename', async () => {
        const to = prompt(`New name for "${a.name}"`, a.name);
        if (!to || to === a.name) return;
        await app.store.rename(a.name, to);
        say(`Renamed "${a.name}" to "${to}".`);
        await app.refreshAdapters();
      });
      button('Export', async () => offerDownloads(await app.store.export(a.name), $('adapter-downloads'), `Files of "${a.name}"`));
      button('Delete', async () => {
        if (app.model?.adapters().includes(a.name) && !app.model.mergedAdapters.includes(a.name)) await app.model.deleteAdapter(a.name);
        await app.store.delete(a.name);
        say(`Deleted "${a.name}".`);
        await app.refreshAdapters();
      });
      row.append(actions);
      body.append(row);
    }
    if (!list.length) {
      const row = document.createElement('tr');
      const td = document.createElement('td');
      td.colSpan = 8;
      td.textContent = 'No adapters yet: train one above or import PEFT files.';
      row.append(td);
      body.append(row);
    }
    const loaded = Boolean(app.model);
    $('disable-button').disabled = !loaded || !app.model.activeAdapter || app.model.disabled;
    $('enable-button').disabled = !loaded || !app.model.disabled;
    $('compare-button').disabled = !loaded || !app.model.activeAdapter;
    $('merge-button').disabled = !loaded || !app.model.activeAdapter || app.model.disabled || app.model.mergedAdapters.includes(app.model.activeAdapter);
    const persisted = await app.store.persisted();
    $('storage-status').textContent = persisted === true
      ? 'Storage is persistent: the browser keeps these adapters when space runs low.'
      : 'Storage is not persistent: the browser may clear these adapters when space runs low (export the ones you need).';
  };
  app.onModel.push(() => app.refreshAdapters());
  // another tab of this site saved, renamed or deleted an adapter
  app.store?.onChange(guard(() => app.refreshAdapters()));

  const importFiles = guard(async (files) => {
    const meta = await app.store.import(Array.from(files));
    say(`Imported "${meta.name}" (r ${meta.r}, made for ${meta.baseModel?.name ?? 'an unnamed base'}).`);
    await app.refreshAdapters();
  });
  const zone = $('drop-zone');
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (e) => { e.preventDefault(); zone.classList.remove('over'); importFiles(e.dataTransfer.files); });
  zone.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); $('import-files').click(); } });
  $('import-files').addEventListener('change', () => importFiles($('import-files').files));

  $('disable-button').addEventListener('click', guard(async () => { await app.model.disableAdapter(); say('Adapters disabled: the base model answers.'); await app.refreshAdapters(); }));
  $('enable-button').addEventListener('click', guard(async () => { await app.model.enableAdapter(); say(`"${app.model.activeAdapter}" is active again.`); await app.refreshAdapters(); }));

  $('compare-button').addEventListener('click', guard(async () => {
    const prompt = $('compare-prompt').value;
    const answer = async () => {
      let text = '';
      for await (const piece of app.model.generate(prompt, { maxNewTokens: Number($('max-new-tokens').value) })) text += piece;
      return text;
    };
    $('compare-name').textContent = `(${app.model.activeAdapter})`;
    $('compare-base').textContent = $('compare-adapter').textContent = '…';
    const wasDisabled = app.model.disabled;
    await app.model.disableAdapter();
    $('compare-base').textContent = await answer();
    await app.model.enableAdapter();
    $('compare-adapter').textContent = await answer();
    if (wasDisabled) await app.model.disableAdapter();
    $('compare-base').parentElement.parentElement.dataset.done = 'true';
  }));
}

