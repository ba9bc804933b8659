// The topology graph: who calls whom, laid out in layers from left to right (callers on
// the left, services that are only called on the right), drawn as SVG. The layout is a
// pure function of the services and the edges, so the same mesh always looks the same.

const SVG = "http://www.w3.org/2000/svg";

export const GEOMETRY = Object.freeze({
  nodeWidth: 132,
  nodeHeight: 46,
  layerGap: 150,
  rowGap: 44,
  margin: 24,
});

/**
 * Places `nodes` (service names) given `edges` ({source, destination}): each node's
 * layer is the length of the longest call chain leading to it, so every edge that is
 * not part of a cycle points right; within a layer, nodes are ordered by the average
 * position of their neighbours (a few sweeps of the barycentre heuristic), which keeps
 * crossings few. Edges closing a cycle are kept, and marked `back`.
 *
 * Returns {nodes: {name: {x, y, layer}}, edges: [{source, destination, back, path,
 * label: {x, y}}], width, height}.
 */
export function layout(nodes, edges, geometry = GEOMETRY) {
  const names = [...new Set([...nodes, ...edges.flatMap((e) => [e.source, e.destination])])].sort();
  const out = new Map(names.map((n) => [n, []]));
  for (const e of edges) if (e.source !== e.destination) out.get(e.source).push(e.destination);
  for (const list of out.values()) list.sort();

  // Edges that close a cycle, found by a depth-first walk in name order: leaving them
  // out of the ranking leaves a DAG.
  const back = new Set();
  const state = new Map(); // name -> "open" | "done"
  for (const root of names) {
    if (state.has(root)) continue;
    const stack = [[root, 0]];
    state.set(root, "open");
    while (stack.length) {
      const top = stack[stack.length - 1];
      const [name, i] = top;
      const next = out.get(name)[i];
      if (next === undefined) {
        state.set(name, "done");
        stack.pop();
        continue;
      }
      top[1] += 1;
      if (state.get(next) === "open") back.add(`${name}\u0000${next}`);
      else if (!state.has(next)) {
        state.set(next, "open");
        stack.push([next, 0]);
      }
    }
  }
  const forward = (a, b) => a !== b && !back.has(`${a}\u0000${b}`);

  // Longest path from the callers: Kahn's order over the forward edges.
  const incoming = new Map(names.map((n) => [n, 0]));
  for (const [a, list] of out) for (const b of list) if (forward(a, b)) incoming.set(b, incoming.get(b) + 1);
  const layer = new Map(names.map((n) => [n, 0]));
  const ready = names.filter((n) => incoming.get(n) === 0);
  while (ready.length) {
    const a = ready.shift();
    for (const b of out.get(a)) {
      if (!forward(a, b)) continue;
      layer.set(b, Math.max(layer.get(b), layer.get(a) + 1));
      incoming.set(b, incoming.get(b) - 1);
      if (incoming.get(b) === 0) ready.push(b);
    }
  }

  const depth = Math.max(0, ...layer.values()) + 1;
  const layers = Array.from({ length: depth }, () => []);
  for (const n of names) layers[layer.get(n)].push(n);
  const neighbours = new Map(names.map((n) => [n, []]));
  for (const [a, list] of out) {
    for (const b of list) {
      neighbours.get(a).push(b);
      neighbours.get(b).push(a);
    }
  }
  const order = () => new Map(layers.flatMap((l) => l.map((n, i) => [n, i])));
  for (let sweep = 0; sweep < 4; sweep++) {
    const position = order();
    const sequence = sweep % 2 === 0 ? layers.slice(1) : layers.slice(0, -1).reverse();
    for (const row of sequence) {
      const centre = (n) => {
        const around = neighbours.get(n).filter((m) => layer.get(m) !== layer.get(n));
        if (!around.length) return position.get(n);
        return around.reduce((s, m) => s + position.get(m), 0) / around.length;
      };
      const keyed = row.map((n) => [centre(n), position.get(n), n]);
      keyed.sort((x, y) => x[0] - y[0] || x[1] - y[1] || (x[2] < y[2] ? -1 : 1));
      row.splice(0, row.length, ...keyed.map((k) => k[2]));
    }
  }

  const g = geometry;
  const tallest = Math.max(1, ...layers.map((l) => l.length));
  const pitch = g.nodeHeight + g.rowGap;
  const placed = {};
  layers.forEach((row, l) => {
    const offset = ((tallest - row.length) * pitch) / 2;
    row.forEach((n, i) => {
      placed[n] = { x: g.margin + l * (g.nodeWidth + g.layerGap), y: g.margin + offset + i * pitch, layer: l };
    });
  });

  const drawn = edges.map((e) => {
    const a = placed[e.source];
    const b = placed[e.destination];
    const isBack = e.source === e.destination || !forward(e.source, e.destination);
    const [p0, p1, p2, p3] = curve(a, b, isBack, g);
    const label = {
      x: (p0[0] + 3 * p1[0] + 3 * p2[0] + p3[0]) / 8,
      y: (p0[1] + 3 * p1[1] + 3 * p2[1] + p3[1]) / 8,
    };
    const path = `M${p0.join(",")} C${p1.join(",")} ${p2.join(",")} ${p3.join(",")}`;
    const bottom = Math.max(p0[1], p1[1], p2[1], p3[1]);
    return { ...e, back: isBack, path, label, bottom };
  });
  return {
    nodes: placed,
    edges: drawn,
    width: 2 * g.margin + depth * g.nodeWidth + (depth - 1) * g.layerGap,
    // room below the lowest row for the curves of calls back to the left: a Bézier
    // curve stays within its control points
    height: Math.max(g.margin + tallest * pitch - g.rowGap, ...drawn.map((e) => e.bottom)) + g.margin,
  };
}

function curve(a, b, isBack, g) {
  const midA = a.y + g.nodeHeight / 2;
  const midB = b.y + g.nodeHeight / 2;
  if (!isBack) {
    const start = [a.x + g.nodeWidth, midA];
    const end = [b.x, midB];
    const bend = (end[0] - start[0]) / 2;
    return [start, [start[0] + bend, start[1]], [end[0] - bend, end[1]], end];
  }
  // a call back to the left (or to itself): out of the bottom, round below, into the bottom
  const start = [a.x + g.nodeWidth / 2 + 10, a.y + g.nodeHeight];
  const end = [b.x + g.nodeWidth / 2 - 10, b.y + g.nodeHeight];
  const drop = 40 + Math.abs(start[0] - end[0]) / 6;
  return [start, [start[0], start[1] + drop], [end[0], end[1] + drop], end];
}

function el(name, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, String(v));
  for (const child of children) node.append(child);
  return node;
}

/**
 * The graph as an SVG element. `edges` carry their metrics (rps, success_rate, may be
 * absent); `health` and `label` turn them into a class and a text; `href` links a node.
 */
export function draw(nodes, edges, { health, label, href, title, caption = () => "" }) {
  const placed = layout(nodes, edges);
  const svg = el("svg", {
    viewBox: `0 0 ${placed.width} ${placed.height}`,
    width: placed.width,
    height: placed.height,
    role: "img",
    "aria-labelledby": "topology-title",
    class: "topology",
  });
  svg.append(el("title", { id: "topology-title" }, title));
  const defs = el("defs");
  for (const kind of ["good", "fair", "poor", "unknown"]) {
    defs.append(
      el(
        "marker",
        {
          id: `arrow-${kind}`,
          viewBox: "0 0 10 10",
          refX: 9,
          refY: 5,
          markerUnits: "userSpaceOnUse",
          markerWidth: 11,
          markerHeight: 11,
          orient: "auto-start-reverse",
        },
        el("path", { d: "M0,0 L10,5 L0,10 z", class: `arrowhead ${kind}` }),
      ),
    );
  }
  svg.append(defs);
  const edgeLayer = el("g", { class: "edges" });
  for (const e of placed.edges) {
    const kind = health(e.success_rate);
    const width = e.rps ? Math.min(5, 1.5 + Math.log10(1 + e.rps)) : 1.5;
    const group = el("g", {
      class: `edge ${kind}${e.back ? " back" : ""}`,
      "data-source": e.source,
      "data-destination": e.destination,
    });
    group.append(el("title", {}, `${e.source} → ${e.destination}: ${label(e)}`));
    group.append(el("path", { d: e.path, "stroke-width": width.toFixed(2), "marker-end": `url(#arrow-${kind})` }));
    const at = { x: e.label.x.toFixed(1), y: (e.label.y - 6).toFixed(1), "text-anchor": "middle" };
    const text = el("text", at, label(e));
    group.append(text);
    edgeLayer.append(group);
  }
  svg.append(edgeLayer);
  const nodeLayer = el("g", { class: "nodes" });
  for (const [name, p] of Object.entries(placed.nodes)) {
    const link = el("a", { href: href(name) });
    link.append(
      el("rect", { x: p.x, y: p.y, width: GEOMETRY.nodeWidth, height: GEOMETRY.nodeHeight, rx: 8 }),
      el("text", { x: p.x + GEOMETRY.nodeWidth / 2, y: p.y + 20, "text-anchor": "middle" }, name),
      el(
        "text",
        { x: p.x + GEOMETRY.nodeWidth / 2, y: p.y + 37, "text-anchor": "middle", class: "caption" },
        caption(name),
      ),
    );
    nodeLayer.append(el("g", { class: "node", "data-service": name }, link));
  }
  svg.append(nodeLayer);
  return svg;
}
