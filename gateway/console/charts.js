// One chart per metric (uPlot, vendored): the average line over a min/max band of aggregated
// windows; live readings are folded into their window's bucket as they arrive.

const UNIT_MS = { us: 0.001, ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 };

// "90s", "1h30m", "1d" -> milliseconds
export function windowMs(window) {
  let total = 0;
  for (const [, amount, unit] of String(window).matchAll(/(\d+)(us|ms|s|m|h|d|w)/g)) {
    total += Number(amount) * UNIT_MS[unit];
  }
  return total || 60_000;
}

// The index of the last x <= t (-1 if none); xs ascending.
function lastAtOrBefore(xs, t) {
  let lo = 0;
  let hi = xs.length - 1;
  let found = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] <= t) {
      found = mid;
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  return found;
}

// The y axis as wide as its longest label (12 px digits are ~7 px wide).
function axisWidth(u, values) {
  const longest = Math.max(0, ...(values || []).map((v) => String(v).length));
  return Math.max(40, longest * 7 + 20);
}

export class MetricChart {
  // buckets: the aggregate answer's [{start, avg, min, max, count}]; window: its bucket width.
  // startMs, endMs: the range asked; the x axis spans it (and what arrives live past its end).
  constructor(element, { metric, unit, buckets, window, startMs, endMs }) {
    this.element = element;
    this.endMs = endMs;
    this.metric = metric;
    this.unit = unit;
    this.windowMs = windowMs(window);
    this.startMs = startMs;
    this.live = []; // live readings folded in: [{ts, value}]
    this.xs = [];
    this.avg = [];
    this.min = [];
    this.max = [];
    this.count = [];
    for (const b of buckets) {
      if (b.avg === null || b.avg === undefined) continue;
      this.xs.push(Date.parse(b.start) / 1000);
      this.avg.push(b.avg);
      this.min.push(b.min ?? b.avg);
      this.max.push(b.max ?? b.avg);
      this.count.push(b.count ?? 1);
    }
    this.plot = new uPlot(this.options(), this.data, element);
    this.resize = new ResizeObserver(() => {
      const width = this.width();
      if (width !== this.plot.width) this.plot.setSize({ width, height: this.plot.height });
    });
    this.resize.observe(element);
  }

  get data() {
    return [this.xs, this.avg, this.min, this.max];
  }

  width() {
    return Math.max(200, Math.floor(this.element.clientWidth || 300));
  }

  options() {
    const unit = this.unit ? ` (${this.unit})` : "";
    return {
      width: this.width(),
      height: 220,
      scales: {
        x: {
          time: true,
          // From the data, not uPlot's min/max: for a lone point those span 1,000 days.
          range: () => [
            Math.min(this.xs[0] ?? Infinity, this.startMs / 1000),
            Math.max(this.xs[this.xs.length - 1] ?? -Infinity, this.endMs / 1000),
          ],
        },
      },
      series: [
        {},
        // (points shown where they are few: a lone bucket is a dot, not nothing)
        { label: `avg${unit}`, stroke: "#1a5fb4", width: 2 },
        { label: "min", stroke: "rgba(26, 95, 180, 0.35)", width: 1, points: { show: false } },
        { label: "max", stroke: "rgba(26, 95, 180, 0.35)", width: 1, points: { show: false } },
      ],
      bands: [{ series: [3, 2], fill: "rgba(26, 95, 180, 0.15)" }],
      axes: [{}, { label: this.unit || undefined, size: axisWidth }],
      legend: { live: true },
    };
  }

  // Folds a reading into its bucket (a new bucket if its window has none yet).
  add(tsMs, value) {
    if (tsMs < this.startMs || !Number.isFinite(value)) return;
    this.live.push({ ts: tsMs, value });
    const t = tsMs / 1000;
    const w = this.windowMs / 1000;
    const i = lastAtOrBefore(this.xs, t);
    if (i >= 0 && t < this.xs[i] + w) {
      const n = this.count[i];
      this.avg[i] = (this.avg[i] * n + value) / (n + 1);
      this.min[i] = Math.min(this.min[i], value);
      this.max[i] = Math.max(this.max[i], value);
      this.count[i] = n + 1;
    } else {
      let start = Math.floor(t / w) * w;
      if (i >= 0 && start < this.xs[i] + w) start = this.xs[i] + w; // stays in order
      this.xs.splice(i + 1, 0, start);
      this.avg.splice(i + 1, 0, value);
      this.min.splice(i + 1, 0, value);
      this.max.splice(i + 1, 0, value);
      this.count.splice(i + 1, 0, 1);
    }
    this.plot.setData(this.data);
  }

  destroy() {
    this.resize.disconnect();
    this.plot.destroy();
  }
}
