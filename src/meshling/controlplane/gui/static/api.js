// The REST API as the GUI uses it: the admin token, kept in this tab's sessionStorage,
// sent as a bearer token on every call; a refusal becomes an error the page can show.

const TOKEN_KEY = "meshling.adminToken";
const TIMEOUT_MS = 10000;

/** The control plane refused the token, or there is none yet. */
export class AuthError extends Error {}

/** Any other failed call: the status and the API's own `error` message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/**
 * Moves a token given in the address (`/gui/#token=...`) into sessionStorage, and takes
 * it out of the address bar and the history, so that it is not bookmarked or shared.
 */
export function takeTokenFromAddress() {
  const match = /^#token=([^&]*)(?:&(.*))?$/.exec(window.location.hash);
  if (!match) return false;
  setToken(decodeURIComponent(match[1]));
  const rest = match[2] ? `#${match[2]}` : "#/";
  window.history.replaceState(null, "", window.location.pathname + window.location.search + rest);
  return true;
}

export function token() {
  return window.sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  window.sessionStorage.setItem(TOKEN_KEY, value.trim());
}

export function clearToken() {
  window.sessionStorage.removeItem(TOKEN_KEY);
}

/**
 * GET `path` with the token; the decoded JSON. With `optional`, a 404 is `null`: for
 * routes a control plane may not serve (the stats of one without metrics, the status of
 * one without a distributor).
 */
export async function get(path, { optional = false } = {}) {
  const bearer = token();
  if (!bearer) throw new AuthError("");
  let response;
  try {
    response = await fetch(path, {
      headers: { Authorization: `Bearer ${bearer}`, Accept: "application/json" },
      cache: "no-store",
      // a control plane that stops answering must not stall the poll for good
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
  } catch (e) {
    throw new ApiError(0, `cannot reach the control plane (${e.message}); retrying`);
  }
  if (response.status === 404 && optional) return null;
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const message = body && typeof body.error === "string" ? body.error : response.statusText;
  if (response.status === 401) throw new AuthError(message);
  if (!response.ok) throw new ApiError(response.status, `${path}: ${response.status} ${message}`);
  return body;
}

/** The path of a resource or route, each part escaped. */
export function path(...parts) {
  return parts.map((p, i) => (i === 0 ? p : encodeURIComponent(p))).join("/");
}
