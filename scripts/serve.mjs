// A small static server for the demo: www/ at /, the package (lib/) at /lib/, the converted models
// at /models/, the sample datasets at /data/ and the test fixtures at /fixtures/. Loopback only. Usage: node scripts/serve.mjs [--port 8080]
import { createServer } from 'node:http';
import { createReadStream, statSync } from 'node:fs';
import { extname, join, normalize, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(fileURLToPath(import.meta.url), '../..');
export const MOUNTS = [
  ['/models/', join(root, 'models')],
  ['/fixtures/', join(root, 'tests', 'fixtures')],
  ['/lib/', join(root, 'lib')],
  ['/data/', join(root, 'data')],
  ['/', join(root, 'www')],
];
const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8', '.json': 'application/json', '.wasm': 'application/wasm',
  '.jinja': 'text/plain; charset=utf-8', '.png': 'image/png', '.svg': 'image/svg+xml', '.jsonl': 'text/plain; charset=utf-8',
};

function resolvePath(urlPath, mounts) {
  const path = decodeURIComponent(urlPath.split('?')[0]);
  for (const [prefix, dir] of mounts) {
    if (!path.startsWith(prefix)) continue;
    const file = normalize(join(dir, path.slice(prefix.length)));
    if (file !== dir && !file.startsWith(dir + sep)) return null; // no escaping the mount
    return file.endsWith(sep) || path.endsWith('/') ? join(file, 'index.html') : file;
  }
  return null;
}

/** Serves `mounts` ([[url prefix, directory], ...], first match wins) on host:port. */
export function serve(port = 8080, host = '127.0.0.1', mounts = MOUNTS) {
  const server = createServer((req, res) => {
    let file;
    try {
      file = resolvePath(req.url, mounts);
    } catch {
      file = null;
    }
    let stat;
    try {
      stat = file && statSync(file);
    } catch {
      stat = null;
    }
    if (!stat || !stat.isFile()) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      return res.end('not found\n');
    }
    res.writeHead(200, {
      'content-type': TYPES[extname(file)] ?? 'application/octet-stream',
      'content-length': stat.size,
      'cache-control': 'no-cache',
    });
    if (req.method === 'HEAD') return res.end();
    createReadStream(file).pipe(res);
  });
  return new Promise((ok, fail) => {
    server.once('error', fail);
    server.listen(port, host, () => ok(server));
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const i = process.argv.indexOf('--port');
  const port = i > 0 ? Number(process.argv[i + 1]) : Number(process.env.PORT ?? 8080);
  serve(port).then(
    () => console.log(`webgpu-lora demo: http://127.0.0.1:${port}/  (Ctrl+C to stop)`),
    (e) => { console.error(`cannot serve on 127.0.0.1:${port}: ${e.message}`); process.exit(1); },
  );
}
