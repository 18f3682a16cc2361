// Small helpers the playground's panels share.

export const $ = (id) => document.getElementById(id);

export function formatBytes(n) {
  return n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${Math.max(1, Math.round(n / 1e3))} kB`;
}

/** A function that shows a message in element `id`, styled as an error when `isError`. */
export function statusLine(id) {
  return (text, isError = false) => {
    $(id).textContent = text;
    $(id).classList.toggle('error', isError);
  };
}

/**
 * Offers files (name -> Blob) as download links in `container`: one link a file, each a click of
 * its own (browsers block several downloads started by one click).
 */
export function offerDownloads(files, container, label) {
  container.replaceChildren(document.createTextNode(`${label}: `));
  for (const [name, blob] of Object.entries(files)) {
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = name;
    a.textContent = `${name} (${formatBytes(blob.size)})`;
    container.append(a, ' ');
  }
}
