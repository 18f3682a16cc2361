// The package's engine worker with GPU work counted (gpu-counters.js, imported first, so the
// WebGPU prototypes are wrapped before the engine's module runs). A static import: a worker module
// whose top-level await imports the engine breaks headless Chromium's page.
import './gpu-counters.js';
import '/lib/worker.js';
