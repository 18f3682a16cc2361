// A small line chart on a canvas: loss curves by step (by default training loss per step and
// validation loss per evaluation).
const DEFAULT_SERIES = [['train', 'training loss', '#3b6fd8'], ['val', 'validation loss', '#d8743b']];

export class LossChart {
  /** `series`: [[key, label, color], ...]. */
  constructor(canvas, series = DEFAULT_SERIES) {
    this.canvas = canvas;
    this.kinds = series;
    this.reset();
  }

  reset() {
    this.series = Object.fromEntries(this.kinds.map(([key]) => [key, []]));
    this.draw();
  }

  add(kind, step, loss) {
    if (Number.isFinite(loss)) this.series[kind].push([step, loss]);
    this.draw();
  }

  /** Points drawn so far, for tests and screen readers. */
  get points() { return Object.values(this.series).reduce((n, s) => n + s.length, 0); }

  draw() {
    const c = this.canvas.getContext('2d');
    const { width: w, height: h } = this.canvas;
    const pad = { l: 44, r: 10, t: 10, b: 24 };
    c.clearRect(0, 0, w, h);
    c.font = '12px system-ui, sans-serif';
    c.strokeStyle = '#bbb';
    c.strokeRect(pad.l, pad.t, w - pad.l - pad.r, h - pad.t - pad.b);
    const all = Object.values(this.series).flat();
    if (!all.length) {
      c.fillStyle = '#777';
      c.fillText('loss appears here while training', pad.l + 10, h / 2);
      return;
    }
    const maxStep = Math.max(1, ...all.map((p) => p[0]));
    const losses = all.map((p) => p[1]);
    const lo = Math.min(...losses), hi = Math.max(...losses);
    const span = hi - lo || 1;
    const x = (s) => pad.l + (s / maxStep) * (w - pad.l - pad.r);
    const y = (v) => pad.t + (1 - (v - lo) / span) * (h - pad.t - pad.b);
    c.fillStyle = '#555';
    c.fillText(hi.toFixed(2), 4, pad.t + 10);
    c.fillText(lo.toFixed(2), 4, h - pad.b);
    c.fillText(`step ${maxStep}`, w - pad.r - 60, h - 6);
    const line = (points, color, label, offset) => {
      c.strokeStyle = color;
      c.fillStyle = color;
      c.lineWidth = 2;
      c.beginPath();
      points.forEach(([s, v], i) => (i ? c.lineTo(x(s), y(v)) : c.moveTo(x(s), y(v))));
      c.stroke();
      for (const [s, v] of points) c.fillRect(x(s) - 2, y(v) - 2, 4, 4);
      c.fillText(label, pad.l + 8 + offset, pad.t + 14);
    };
    this.kinds.forEach(([key, label, color], i) => line(this.series[key], color, label, i * 110));
  }
}
