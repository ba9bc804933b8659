// How numbers, times and documents are shown: one place, so every page agrees.

export const DASH = "–";

export function rps(value) {
  if (value === null || value === undefined) return DASH;
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

/** A success rate, rounded down: 98.99% shows as 98.9%, never as the 99% it is not. */
export function percent(rate) {
  if (rate === null || rate === undefined) return DASH;
  const p = rate * 100;
  if (p >= 100 || p <= 0) return `${p.toFixed(0)}%`;
  // the epsilon keeps binary fractions (0.57 * 100 = 56.99999...) from losing a tenth
  return `${(Math.floor(p * 10 + 1e-6) / 10).toFixed(1)}%`;
}

/** A class for a success rate: good at 99% and above, poor below 95%. */
export function health(rate) {
  if (rate === null || rate === undefined) return "unknown";
  if (rate >= 0.99) return "good";
  if (rate >= 0.95) return "fair";
  return "poor";
}

export function ms(value) {
  if (value === null || value === undefined) return DASH;
  if (value >= 100) return `${value.toFixed(0)} ms`;
  return `${value >= 10 ? value.toFixed(1) : value.toFixed(2)} ms`;
}

export function count(value) {
  if (value === null || value === undefined) return DASH;
  return value.toLocaleString("en");
}

/** "in 23h 59m" or "5m 2s ago": a moment relative to `now` (both in milliseconds). */
export function relative(iso, now = Date.now()) {
  if (!iso) return DASH;
  const moment = Date.parse(iso);
  if (Number.isNaN(moment)) return String(iso);
  const seconds = Math.round((moment - now) / 1000);
  const text = duration(Math.abs(seconds));
  return seconds >= 0 ? `in ${text}` : `${text} ago`;
}

export function duration(seconds) {
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

export function tags(map) {
  if (!map || typeof map !== "object") return "";
  return Object.entries(map)
    .map(([k, v]) => `${k}=${v}`)
    .join(", ");
}

const PLAIN = /^[A-Za-z_/][A-Za-z0-9_ ./:@*-]*$/;
const RESERVED = /^(true|false|yes|no|on|off|null|~|y|n)$/i;

function scalar(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  const text = String(value);
  if (PLAIN.test(text) && !RESERVED.test(text) && !/\s$/.test(text) && !/: /.test(text)) {
    return text;
  }
  return JSON.stringify(text);
}

function isCollection(value) {
  return value !== null && typeof value === "object" && Object.keys(value).length > 0;
}

function emptyCollection(value) {
  return Array.isArray(value) ? "[]" : "{}";
}

/** A JSON value as block-style YAML, as resources are written by hand. */
export function yaml(value, indent = "") {
  if (!isCollection(value)) {
    return (value !== null && typeof value === "object" ? emptyCollection(value) : scalar(value)) + "\n";
  }
  let out = "";
  if (Array.isArray(value)) {
    for (const item of value) {
      if (isCollection(item) && !Array.isArray(item)) {
        const body = yaml(item, `${indent}  `);
        out += `${indent}- ${body.slice(indent.length + 2)}`;
      } else if (isCollection(item)) {
        out += `${indent}-\n${yaml(item, `${indent}  `)}`;
      } else {
        out += `${indent}- ${yaml(item).trimEnd()}\n`;
      }
    }
    return out;
  }
  for (const [key, item] of Object.entries(value)) {
    if (isCollection(item)) {
      out += `${indent}${scalar(key)}:\n${yaml(item, `${indent}  `)}`;
    } else {
      out += `${indent}${scalar(key)}: ${yaml(item).trimEnd()}\n`;
    }
  }
  return out;
}
