// The meshling GUI: hash routes (#/services/api), each page built from the REST API and
// rebuilt every few seconds; no framework, no build step. Every text from the API goes
// into the page as text (never as HTML), and every link is a real href.

import { ApiError, AuthError, clearToken, get, path, setToken, takeTokenFromAddress, token } from "./api.js";
import * as fmt from "./format.js";
import { draw } from "./topology.js";

const POLL_MS = 3000;
const WINDOW_S = 60;
const MESH_KEY = "meshling.mesh";

const main = document.getElementById("main");
const updated = document.getElementById("updated");
const meshForm = document.getElementById("mesh-form");
const meshSelect = document.getElementById("mesh");
const signOut = document.getElementById("sign-out");

// -- DOM ------------------------------------------------------------------------------

/** An element: `h("a", {href: "#/"}, "text", child)`; strings become text nodes. */
function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) {
    if (v === false || v === null || v === undefined) continue;
    node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function link(href, text) {
  return h("a", { href }, text);
}

function table(id, caption, headers, rows, empty) {
  const head = h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t))));
  const body = h("tbody", {});
  for (const row of rows) {
    body.append(h("tr", {}, row.map((cell, i) => (i === 0 ? h("th", { scope: "row" }, cell) : h("td", {}, cell)))));
  }
  if (!rows.length) body.append(h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, empty)));
  return h("table", { id }, h("caption", {}, caption), head, body);
}

function details(pairs) {
  return h("dl", { class: "facts" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function rate(value) {
  return h("span", { class: `rate ${fmt.health(value)}` }, fmt.percent(value));
}

function online(isOnline) {
  return h("span", { class: isOnline ? "state online" : "state offline" }, isOnline ? "online" : "offline");
}

function time(iso) {
  if (!iso) return fmt.DASH;
  return h("time", { datetime: iso, title: iso }, fmt.relative(iso));
}

function notice(text, detail) {
  const more = detail ? h("span", { class: "muted" }, ` (${detail})`) : null;
  return h("p", { class: "notice", role: "status" }, text, more);
}

// -- hrefs ----------------------------------------------------------------------------

const hrefs = {
  service: (name) => `#/services/${encodeURIComponent(name)}`,
  dataplane: (mesh, name) => `#/dataplanes/${encodeURIComponent(mesh)}/${encodeURIComponent(name)}`,
  policy: (kind, mesh, name) =>
    `#/policies/${encodeURIComponent(kind)}/${encodeURIComponent(mesh)}/${encodeURIComponent(name)}`,
  mesh: (name) => `#/meshes/${encodeURIComponent(name)}`,
};

// -- data -----------------------------------------------------------------------------

function mtlsMode(mesh) {
  const mtls = (mesh.spec || {}).mtls || {};
  return mtls.enabled ? mtls.mode || "strict" : "off";
}

async function stats(mesh, extra = "") {
  // Before a control plane serves stats, the GUI still works: no numbers, a note.
  try {
    const answer = await get(`/api/v1/stats?mesh=${encodeURIComponent(mesh)}&window=${WINDOW_S}${extra}`, {
      optional: true,
    });
    if (answer) return { stats: answer, missing: null };
    return { stats: null, missing: "the control plane has no /api/v1/stats" };
  } catch (e) {
    if (e instanceof ApiError) return { stats: null, missing: e.message };
    throw e;
  }
}

/** Everything the pages of one mesh show, in one shape. */
async function meshData(mesh) {
  const q = `?mesh=${encodeURIComponent(mesh)}`;
  const [resources, status, selections, metrics] = await Promise.all([
    get(`/api/v1/Dataplane${q}`),
    get(`/api/v1/status/dataplanes${q}`, { optional: true }),
    get(`/api/v1/policies/dataplanes${q}`),
    stats(mesh),
  ]);
  const statusOf = new Map(((status && status.items) || []).map((s) => [s.name, s]));
  const dataplanes = resources.items.map((r) => {
    const spec = r.spec || {};
    return {
      name: r.metadata.name,
      mesh: r.metadata.mesh,
      service: spec.service,
      tags: spec.tags || {},
      inbounds: spec.inbounds || [],
      outbounds: spec.outbounds || [],
      status: statusOf.get(r.metadata.name) || { online: false, connected: false },
    };
  });
  const policies = selections.items;
  const services = new Map();
  const service = (name) => {
    if (!services.has(name)) services.set(name, { name, dataplanes: [], online: 0, metrics: null, routes: [] });
    return services.get(name);
  };
  for (const d of dataplanes) {
    const s = service(d.service);
    s.dataplanes.push(d);
    if (d.status.online) s.online += 1;
  }
  const edges = new Map();
  const edge = (source, destination) => {
    const key = `${source}\u0000${destination}`;
    if (!edges.has(key)) {
      edges.set(key, { source, destination, rps: null, success_rate: null, requests: null, p99_ms: null });
    }
    return edges.get(key);
  };
  // who calls whom as configured (outbounds), then what the traffic says
  for (const d of dataplanes) for (const o of d.outbounds) if (o.service) edge(d.service, o.service);
  const s = metrics.stats;
  if (s) {
    for (const m of s.services || []) service(m.service).metrics = m;
    for (const r of s.routes || []) service(r.service).routes.push(r);
    for (const e of s.edges || []) Object.assign(edge(e.source, e.destination), e);
  }
  return {
    mesh,
    dataplanes,
    policies,
    services: [...services.values()].sort((a, b) => (a.name < b.name ? -1 : 1)),
    edges: [...edges.values()],
    stats: s,
    missing: metrics.missing,
    hasStatus: status !== null,
  };
}

/** Mesh-wide numbers: requests/s summed over services, success weighted by requests. */
function meshTotals(data) {
  let rps = 0;
  let requests = 0;
  let ok = 0;
  for (const s of data.services) {
    const m = s.metrics;
    if (!m) continue;
    rps += m.rps || 0;
    if (m.success_rate !== null && m.requests) {
      requests += m.requests;
      ok += m.success_rate * m.requests;
    }
  }
  return { rps: data.stats ? rps : null, success_rate: requests ? ok / requests : null };
}

function policiesSelecting(data, names) {
  const wanted = new Set(names);
  return data.policies.filter((p) => p.dataplanes.some((d) => wanted.has(d)));
}

// -- pieces shared by pages -----------------------------------------------------------

function servicesTable(data, id = "services") {
  const rows = data.services.map((s) => {
    const m = s.metrics || {};
    return [
      link(hrefs.service(s.name), s.name),
      `${s.online}/${s.dataplanes.length}`,
      fmt.rps(m.rps),
      rate(m.success_rate),
      fmt.ms(m.p50_ms),
      fmt.ms(m.p95_ms),
      fmt.ms(m.p99_ms),
    ];
  });
  return table(
    id,
    `Services of mesh ${data.mesh}: golden metrics over the last ${WINDOW_S} s`,
    ["Service", "Dataplanes online", "Requests/s", "Success rate", "p50", "p95", "p99"],
    rows,
    "No dataplanes registered in this mesh.",
  );
}

function metricsNotice(data) {
  if (data.stats) return null;
  return notice("No metrics yet: the numbers appear once the control plane serves them.", data.missing);
}

function edgeLabel(e) {
  if (e.rps === null || e.rps === undefined) return "no traffic data";
  return `${fmt.percent(e.success_rate)} · ${fmt.rps(e.rps)} rps`;
}

function edgesTable(id, caption, edges) {
  return table(
    id,
    caption,
    ["Caller → service", "Requests/s", "Success rate", "p99"],
    edges.map((e) => [
      h("span", {}, link(hrefs.service(e.source), e.source), " → ", link(hrefs.service(e.destination), e.destination)),
      fmt.rps(e.rps),
      rate(e.success_rate),
      fmt.ms(e.p99_ms),
    ]),
    "None.",
  );
}

function dataplanesTable(data, list, id = "dataplanes") {
  return table(
    id,
    `Dataplanes (${list.length})`,
    [
      "Dataplane",
      "Service",
      "State",
      "Replica",
      "Snapshot applied / pushed",
      "Last NACK",
      "Certificate expires",
      "Tags",
    ],
    list.map((d) => {
      const st = d.status;
      return [
        link(hrefs.dataplane(d.mesh, d.name), d.name),
        link(hrefs.service(d.service), d.service),
        online(st.online),
        st.replica || fmt.DASH,
        snapshotState(st),
        nack(st.last_nack),
        time(st.certificate_expires),
        fmt.tags(d.tags) || fmt.DASH,
      ];
    }),
    data.hasStatus ? "No dataplanes registered in this mesh." : "No dataplanes.",
  );
}

/** Applied vs pushed, and what the proxy said of the latest push: ACK (it runs it),
 * NACK (it refused it and runs the one before), or nothing yet. */
function snapshotState(st) {
  if (!st.pushed && !st.applied) return fmt.DASH;
  const versions = `${st.applied || fmt.DASH} / ${st.pushed || fmt.DASH}`;
  if (st.pushed && st.applied === st.pushed) return h("span", { class: "sync" }, versions, " (ACK)");
  if (st.last_nack && st.last_nack.version === st.pushed) return h("span", { class: "nack" }, versions, " (NACK)");
  return h("span", { class: "behind" }, versions, " (pending)");
}

function nack(last) {
  if (!last) return h("span", { class: "muted" }, "none");
  return h("span", { class: "nack" }, `${last.version}: ${last.reason} `, time(last.at));
}

function policiesList(list) {
  if (!list.length) return h("p", { class: "muted" }, "No policy selects these dataplanes.");
  return h(
    "ul",
    { class: "policies" },
    list.map((p) => h("li", {}, link(hrefs.policy(p.kind, p.mesh, p.name), `${p.kind} ${p.name}`))),
  );
}

// -- pages ----------------------------------------------------------------------------

async function overview(mesh, meshes) {
  const all = await Promise.all(meshes.map((m) => (m.metadata.name === mesh ? null : meshData(m.metadata.name))));
  const current = await meshData(mesh);
  const rows = meshes.map((m, i) => {
    const data = all[i] || current;
    const totals = meshTotals(data);
    const up = data.dataplanes.filter((d) => d.status.online).length;
    return [
      link(hrefs.mesh(m.metadata.name), m.metadata.name),
      mtlsMode(m),
      String(data.services.length),
      `${up}/${data.dataplanes.length}`,
      String(data.policies.length),
      rate(totals.success_rate),
      fmt.rps(totals.rps),
    ];
  });
  return [
    h("h1", {}, "Overview"),
    table(
      "meshes",
      "Meshes",
      ["Mesh", "mTLS", "Services", "Dataplanes online", "Policies", "Success rate", "Requests/s"],
      rows,
      "No meshes yet.",
    ),
    h("h2", {}, `Services of mesh ${mesh}`),
    metricsNotice(current),
    servicesTable(current),
    h("h2", {}, "Who calls whom"),
    h("figure", { class: "graph" }, graph(current)),
    h("p", {}, link("#/topology", "The topology, with every call's latency")),
  ];
}

async function servicesPage(mesh) {
  const data = await meshData(mesh);
  return [h("h1", {}, "Services"), metricsNotice(data), servicesTable(data)];
}

async function servicePage(mesh, name) {
  const [data, routes] = await Promise.all([
    meshData(mesh),
    stats(mesh, `&service=${encodeURIComponent(name)}&by=route`),
  ]);
  const s = data.services.find((x) => x.name === name);
  if (!s) return [h("h1", {}, `Service ${name}`), notice(`No service ${name} in mesh ${mesh}.`)];
  const m = s.metrics || {};
  const routeRows = ((routes.stats && routes.stats.routes) || []).filter((r) => r.service === name);
  const names = s.dataplanes.map((d) => d.name);
  return [
    h("h1", {}, `Service ${name}`),
    metricsNotice(data),
    details([
      ["Mesh", mesh],
      ["Dataplanes online", `${s.online}/${s.dataplanes.length}`],
      ["Requests/s", fmt.rps(m.rps)],
      ["Success rate", rate(m.success_rate)],
      ["Latency p50 / p95 / p99", `${fmt.ms(m.p50_ms)} / ${fmt.ms(m.p95_ms)} / ${fmt.ms(m.p99_ms)}`],
    ]),
    routeRows.length
      ? table(
          "routes",
          "Routes",
          ["Route", "Requests/s", "Success rate", "p50", "p95", "p99"],
          routeRows.map((r) => [
            r.route,
            fmt.rps(r.rps),
            rate(r.success_rate),
            fmt.ms(r.p50_ms),
            fmt.ms(r.p95_ms),
            fmt.ms(r.p99_ms),
          ]),
          "",
        )
      : null,
    h("h2", {}, "Calls"),
    edgesTable("callers", `Callers of ${name}`, data.edges.filter((e) => e.destination === name)),
    edgesTable("callees", `Services ${name} calls`, data.edges.filter((e) => e.source === name)),
    h("h2", {}, "Dataplanes"),
    dataplanesTable(data, s.dataplanes),
    h("h2", {}, "Policies that select its dataplanes"),
    policiesList(policiesSelecting(data, names)),
  ];
}

function graph(data) {
  return draw(
    data.services.map((s) => s.name),
    data.edges,
    {
      health: fmt.health,
      label: edgeLabel,
      href: hrefs.service,
      title: `Who calls whom in mesh ${data.mesh}`,
      caption: (name) => {
        const s = data.services.find((x) => x.name === name);
        return s ? `${s.online}/${s.dataplanes.length} online` : "not registered";
      },
    },
  );
}

async function topologyPage(mesh) {
  const data = await meshData(mesh);
  return [
    h("h1", {}, "Topology"),
    metricsNotice(data),
    h(
      "p",
      { class: "muted" },
      "Callers on the left; each arrow is one service calling another, with its success rate ",
      `and requests/s over the last ${WINDOW_S} s.`,
    ),
    h("figure", { class: "graph" }, graph(data)),
    edgesTable("edges", `Calls in mesh ${mesh}`, data.edges),
  ];
}

async function dataplanesPage(mesh) {
  const data = await meshData(mesh);
  return [h("h1", {}, "Dataplanes"), dataplanesTable(data, data.dataplanes)];
}

async function dataplanePage(mesh, name) {
  const [data, detail] = await Promise.all([
    meshData(mesh),
    get(path("/api/v1/status/dataplanes", mesh, name), { optional: true }),
  ]);
  const d = data.dataplanes.find((x) => x.name === name);
  if (!d) return [h("h1", {}, `Dataplane ${mesh}/${name}`), notice(`No dataplane ${name} in mesh ${mesh}.`)];
  const st = { ...d.status, ...(detail || {}) };
  const parts = [
    h("h1", {}, `Dataplane ${mesh}/${name}`),
    details([
      ["Service", link(hrefs.service(d.service), d.service)],
      ["State", online(st.online)],
      ["Replica", st.replica || fmt.DASH],
      ["Connected", time(st.connected_at)],
      ["Last seen", time(st.last_seen)],
      ["Snapshot applied / pushed", snapshotState(st)],
      ["Last NACK", nack(st.last_nack)],
      ["Certificate expires", time(st.certificate_expires)],
      ["Tags", fmt.tags(d.tags) || fmt.DASH],
    ]),
    table(
      "inbounds",
      "Inbounds",
      ["Port", "Application port", "Protocol"],
      d.inbounds.map((i) => [String(i.port), String(i.service_port ?? fmt.DASH), i.protocol || fmt.DASH]),
      "None (transparent capture or none declared).",
    ),
    table(
      "outbounds",
      "Outbounds",
      ["Port", "Service", "Protocol"],
      d.outbounds.map((o) => [String(o.port), link(hrefs.service(o.service), o.service), o.protocol || fmt.DASH]),
      "None.",
    ),
    h("h2", {}, "Policies that select it"),
    policiesList(policiesSelecting(data, [name])),
  ];
  if (detail && detail.snapshot) {
    const summary = h("summary", {}, `Snapshot ${detail.snapshot_version || ""}`);
    parts.push(h("details", {}, summary, h("pre", {}, fmt.yaml(detail.snapshot))));
  } else if (detail && detail.snapshot_error) {
    parts.push(notice("No snapshot.", detail.snapshot_error));
  }
  return parts;
}

async function policiesPage(mesh) {
  const data = await meshData(mesh);
  const byKind = new Map();
  for (const p of data.policies) {
    if (!byKind.has(p.kind)) byKind.set(p.kind, []);
    byKind.get(p.kind).push(p);
  }
  const parts = [h("h1", {}, "Policies")];
  if (!byKind.size) parts.push(h("p", { class: "muted" }, `No policies in mesh ${mesh}.`));
  for (const [kind, list] of byKind) {
    parts.push(
      h("h2", {}, kind),
      table(
        `policies-${kind}`,
        `${kind} policies (${list.length})`,
        ["Policy", "Selector", "Dataplanes"],
        list.map((p) => [
          link(hrefs.policy(p.kind, p.mesh, p.name), p.name),
          p.error ? h("span", { class: "nack" }, p.error) : `${p.field}: ${p.wanted}`,
          selectedLinks(p),
        ]),
        "",
      ),
    );
  }
  return parts;
}

function selectedLinks(p) {
  if (!p.dataplanes.length) return h("span", { class: "nack" }, "selects no dataplane");
  return h("span", {}, p.dataplanes.flatMap((d, i) => [i ? ", " : "", link(hrefs.dataplane(p.mesh, d), d)]));
}

async function policyPage(kind, mesh, name) {
  const [resource, selection] = await Promise.all([
    get(path("/api/v1", kind, mesh, name)),
    get(path("/api/v1/policies", kind, mesh, name, "dataplanes")),
  ]);
  const md = resource.metadata;
  return [
    h("h1", {}, `${resource.kind} ${mesh}/${name}`),
    details([
      ["Kind", resource.kind],
      ["Mesh", mesh],
      ["Version", String(md.version)],
      ["Updated", time(md.updated)],
      ["Labels", fmt.tags(md.labels) || fmt.DASH],
      ["Selector", `${selection.field}: ${selection.wanted}`],
    ]),
    h("h2", {}, `Selects ${selection.dataplanes.length} dataplane${selection.dataplanes.length === 1 ? "" : "s"}`),
    selection.error ? notice("This stored policy no longer parses; it selects nothing.", selection.error) : null,
    selection.dataplanes.length
      ? h("ul", { id: "selected" }, selection.dataplanes.map((d) => h("li", {}, link(hrefs.dataplane(mesh, d), d))))
      : h("p", { class: "nack" }, "It selects no dataplane."),
    h("h2", {}, "Spec"),
    h("pre", { class: "spec", "aria-label": "Spec as YAML" }, fmt.yaml(resource.spec || {})),
    h("details", {}, h("summary", {}, "As JSON"), h("pre", {}, JSON.stringify(resource, null, 2))),
  ];
}

// -- routing and the poll -------------------------------------------------------------

const ROUTES = [
  [/^$/, (ctx) => overview(ctx.mesh, ctx.meshes), ""],
  [/^meshes\/([^/]+)$/, (ctx, m) => overview(m, ctx.meshes), "", (m) => m],
  [/^services$/, (ctx) => servicesPage(ctx.mesh), "services"],
  [/^services\/([^/]+)$/, (ctx, name) => servicePage(ctx.mesh, name), "services"],
  [/^topology$/, (ctx) => topologyPage(ctx.mesh), "topology"],
  [/^dataplanes$/, (ctx) => dataplanesPage(ctx.mesh), "dataplanes"],
  [/^dataplanes\/([^/]+)\/([^/]+)$/, (ctx, m, n) => dataplanePage(m, n), "dataplanes", (m) => m],
  [/^policies$/, (ctx) => policiesPage(ctx.mesh), "policies"],
  [/^policies\/([^/]+)\/([^/]+)\/([^/]+)$/, (ctx, k, m, n) => policyPage(k, m, n), "policies", (k, m) => m],
];

function route() {
  const raw = window.location.hash.replace(/^#\/?/, "").replace(/\/$/, "");
  for (const [pattern, page, section, meshOf] of ROUTES) {
    const match = pattern.exec(raw);
    if (match) {
      const args = match.slice(1).map(decodeURIComponent);
      return { page, section, args, mesh: meshOf ? meshOf(...args) : null };
    }
  }
  return null;
}

let generation = 0;
let busy = false;
let shown = "";

function show(nodes, key) {
  const next = h("div", {}, nodes);
  const html = key + next.innerHTML;
  if (html === shown) return;
  shown = html;
  main.replaceChildren(...next.childNodes);
}

function signIn(message) {
  meshForm.hidden = true;
  signOut.hidden = true;
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true });
  const form = h(
    "form",
    { id: "sign-in", class: "sign-in" },
    h("label", { for: "token" }, "Admin token"),
    input,
    h("button", { type: "submit" }, "Sign in"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value);
    shown = "";
    refresh(true);
  });
  main.replaceChildren(
    h("h1", {}, "Sign in"),
    message ? h("p", { class: "error", role: "alert", id: "auth-error" }, message) : null,
    h(
      "p",
      {},
      "The GUI reads the control plane's API with its admin token: the file given to ",
      h("code", {}, "meshling control-plane run --token-file"),
      " (",
      h("code", {}, "meshling demo"),
      " prints an address that signs in). It stays in this tab only.",
    ),
    form,
  );
  shown = "sign-in";
  document.title = "Sign in · meshling";
  updated.textContent = "";
  input.focus();
}

async function refresh(navigated = false) {
  if (busy && !navigated) return;
  const mine = ++generation;
  busy = true;
  const current = route();
  try {
    if (!token()) {
      signIn("");
      return;
    }
    for (const a of document.querySelectorAll("nav a")) {
      if (current && a.dataset.section === current.section) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    const meshes = (await get("/api/v1/Mesh")).items;
    const names = meshes.map((m) => m.metadata.name);
    let mesh = (current && current.mesh) || window.sessionStorage.getItem(MESH_KEY) || "default";
    if (!names.includes(mesh)) mesh = names.includes("default") ? "default" : names[0] || "default";
    window.sessionStorage.setItem(MESH_KEY, mesh);
    pickMesh(names, mesh);
    signOut.hidden = false;
    const nodes = current
      ? await current.page({ mesh, meshes }, ...current.args)
      : [h("h1", {}, "Not found"), h("p", {}, "No page here. ", link("#/", "Back to the overview"))];
    if (mine !== generation) return;
    show(nodes, window.location.hash);
    const heading = main.querySelector("h1");
    document.title = heading ? `${heading.textContent} · meshling` : "meshling";
    updated.textContent = `Updated ${new Date().toLocaleTimeString("en-GB")}; refreshed every ${POLL_MS / 1000} s`;
    if (navigated) main.focus({ preventScroll: true });
  } catch (e) {
    if (mine !== generation) return;
    if (e instanceof AuthError) {
      signIn(e.message ? `The control plane refused the token: ${e.message}` : "");
    } else {
      const title = e instanceof ApiError && e.status === 404 ? "Not found" : "Error";
      const back = h("p", {}, link("#/", "Back to the overview"));
      show([h("h1", {}, title), h("p", { class: "error", role: "alert" }, e.message), back], "error");
    }
  } finally {
    if (mine === generation) busy = false;
  }
}

function pickMesh(names, mesh) {
  const options = names.map((n) => h("option", { value: n, selected: n === mesh }, n));
  const now = [...meshSelect.options].map((o) => o.value).join("\u0000");
  if (now !== names.join("\u0000")) meshSelect.replaceChildren(...options);
  meshSelect.value = mesh;
  meshForm.hidden = false;
}

meshSelect.addEventListener("change", () => {
  window.sessionStorage.setItem(MESH_KEY, meshSelect.value);
  const r = route();
  // a page of one mesh's resource makes no sense in another: go to that mesh's list
  if (r && r.mesh) window.location.hash = `#/${r.section}`;
  else refresh(true);
});
meshForm.addEventListener("submit", (event) => event.preventDefault());
// the fragment is the router's: the skip link moves focus without changing it
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});
signOut.addEventListener("click", () => {
  clearToken();
  signIn("Signed out.");
});
window.addEventListener("hashchange", () => {
  if (takeTokenFromAddress()) shown = "";
  refresh(true);
});
window.setInterval(() => {
  if (!document.hidden && token() && shown !== "sign-in") refresh();
}, POLL_MS);

takeTokenFromAddress();
refresh(true);
