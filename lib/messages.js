// Words the page (index.js) and the engine's worker (worker.js) both put into their errors.

/** How to go on after the engine's worker ended or failed. */
export const RECOVER = 'model.recover() starts the engine again and loads the model with its adapters';
