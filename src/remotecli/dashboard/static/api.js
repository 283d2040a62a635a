// The controller's HTTP API as the dashboard uses it: JSON calls, the SSE stream, and errors in
// words. Calls go to the same origin with the login cookie; nothing here touches the page.
// The API is read as docs/api.md and /api/openapi.json describe it, nothing guessed:
// tests/test_dashboard_contract.py checks API_FIELDS and EVENT_NAMES against them, and that the
// pages read no other field.

/**
 * The fields of the API's answers the dashboard reads, by OpenAPI schema name ("events" is the
 * SSE `data:` object of GET /api/sessions/{id}/events). The pages hold each answer in a variable
 * named for it (`problem`: ErrorOut, `provider`, `session` or `current`, `ticket`, `callback`,
 * `sse`, `me`: MeOut, `run`: RunOut, `tokens`: a run's usage, `period`: UsageOut, `limits`: its
 * limits, `ready`: GET /readyz's ReadyOut, `host`: one of its HostOut), so the test can find
 * every field they read.
 */
export const API_FIELDS = {
  ErrorOut: ["message"],
  ProviderOut: [
    "name", "title", "available", "hint", "connected", "connected_at", "updated_at", "preparing",
    "headless", "signs_in",
  ],
  SessionOut: [
    "id",
    "provider",
    "label",
    "state",
    "reason",
    "end_cause",
    "created_at",
    "open_url",
    "viewers",
  ],
  MeOut: ["name"],
  ReadyOut: ["hosts"],
  HostOut: ["name", "address", "up", "slots", "slots_free", "sessions"],
  TicketOut: ["ticket", "vnc_path"],
  CallbackOut: ["status", "body"],
  events: ["state", "reason", "message", "url"],
  RunOut: [
    "id",
    "provider",
    "prompt",
    "state",
    "created_at",
    "started_at",
    "ended_at",
    "exit_code",
    "reason",
    "output",
    "usage",
    "events_path",
  ],
  UsageCountOut: ["input_tokens", "output_tokens"],
  UsageOut: ["period", "period_end", "runs", "input_tokens", "output_tokens", "limits"],
  LimitsOut: ["concurrent_runs", "runs_per_period", "tokens_per_period"],
};

/** The SSE event names the events stream sends. */
export const EVENT_NAMES = ["state", "progress", "open-url"];

/**
 * The events of a headless run's stream (GET /api/runs/{id}/events) and the fields of their
 * `data:` the pages read, each held in a variable of its own name (`said`: text, `toolUse`: tool,
 * `tokens`: usage, `finish`: done, `fault`: error). `done` or `error` is the last one.
 */
export const RUN_EVENTS = {
  text: ["text"],
  tool: ["name", "input"],
  usage: ["input_tokens", "output_tokens"],
  done: ["exit_code", "duration_s"],
  error: ["reason"],
};

/** The states after which a headless run never runs again. */
export const RUN_FINAL_STATES = new Set(["done", "failed", "cancelled"]);

/**
 * The text view's WebSocket (docs/api.md): the same single-use ticket as the desktop's
 * `vnc_path`, as `?ticket=`. WebSocket paths are not in the OpenAPI document, so
 * tests/test_dashboard_contract.py checks this one against the docs and a real controller.
 */
export const TTY_PATH = "/api/sessions/{id}/tty";

/** The text view's WebSocket path for `sessionId` with a ticket from POST .../ticket. */
export function ttyPath(sessionId, ticket) {
  const path = TTY_PATH.replace("{id}", encodeURIComponent(sessionId));
  return `${path}?ticket=${encodeURIComponent(ticket.ticket)}`;
}

/**
 * An API call that failed; `status` is 0 when the server could not be reached at all.
 * `retryAfter` is the seconds a 429 or 503 asked to wait (its Retry-After), else null.
 */
export class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

export const UNREACHABLE =
  "The server is unreachable: check that `remotecli up` is still running, then reload.";
export const NOT_AUTHORISED =
  "Not authorised: your login is missing or no longer valid. Sign in again with the token.";

/** Call the API; resolve with the parsed JSON body (null when empty), or throw ApiError. */
export async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, UNREACHABLE);
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const wait = retryAfter(response.headers.get("Retry-After"));
    throw new ApiError(response.status, describeFailure(response.status, data), wait);
  }
  return data;
}

/** A Retry-After header's delay in whole seconds (it may be a date), or null. */
export function retryAfter(header) {
  if (!header) return null;
  if (/^\s*\d+\s*$/.test(header)) return Number(header);
  const date = Date.parse(header);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

/** Turn an error response into a sentence: the server's `message`, or one naming the status. */
function describeFailure(status, problem) {
  if (status === 401) return NOT_AUTHORISED;
  if (typeof problem?.message === "string" && problem.message) return problem.message;
  if (status === 502 || status === 503 || status === 504) {
    return `The server is not answering (HTTP ${status}); try again in a moment.`;
  }
  return `The server refused the request (HTTP ${status}).`;
}

/** The states after which a session never runs again. */
export const FINAL_STATES = new Set(["stopped", "failed"]);

/** The state, reason, progress message and link (on `open-url`) of an SSE event's data. */
export function sessionFacts(sse) {
  return { state: sse.state, reason: sse.reason, message: sse.message, url: sse.url ?? null };
}

/**
 * The link a session asked a browser to open, as an absolute http(s) URL string, or null when it
 * is anything else (a `javascript:` or `file:` link must never become a link on this page).
 */
export function webLink(url) {
  if (typeof url !== "string" || !/^https?:\/\//i.test(url)) return null;
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? url : null;
  } catch {
    return null;
  }
}

/** Explain in words why a session is over, from its state and reason. */
export function endedMessage(state, reason) {
  if (state === "failed") {
    return `The session ended: it failed${reason ? ` (${reason})` : ""}.`;
  }
  return `The session ended: it was stopped${reason ? ` (${reason})` : ""}.`;
}

/**
 * Follow a session's event stream; call `onEvent(facts, type)` for each event.
 * Returns a function that closes the stream. The stream is closed by itself once the session
 * reaches a final state (the browser would otherwise reconnect to it forever).
 */
export function followEvents(sessionId, onEvent, onBroken) {
  const source = new EventSource(`/api/sessions/${encodeURIComponent(sessionId)}/events`);
  const handle = (event) => {
    const facts = sessionFacts(JSON.parse(event.data));
    if (FINAL_STATES.has(facts.state)) source.close();
    onEvent(facts, event.type);
  };
  for (const name of EVENT_NAMES) source.addEventListener(name, handle);
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) onBroken();
  });
  return () => source.close();
}

/**
 * Follow a headless run's stream at `eventsPath` (the run's `events_path`): `onEvent(name, data)`
 * for each event of RUN_EVENTS, the final `done` or `error` included, after which the stream is
 * closed. The browser reconnects a dropped stream by itself with Last-Event-ID, and the server
 * replays only what came after it, so nothing is shown twice. `onBroken()` when the stream is
 * refused for good (401, 404, the server gone) before its final event. Returns a function that
 * closes it.
 */
export function followRun(eventsPath, onEvent, onBroken) {
  const source = new EventSource(eventsPath);
  let finished = false;
  const handle = (name) => (event) => {
    // The browser's own "error" (the connection) is a plain Event; the run's is a MessageEvent.
    if (!(event instanceof MessageEvent)) {
      if (source.readyState === EventSource.CLOSED && !finished) onBroken();
      return;
    }
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return; // not an event of this API: nothing to show
    }
    if (name === "done" || name === "error") {
      finished = true;
      source.close();
    }
    onEvent(name, data);
  };
  for (const name of Object.keys(RUN_EVENTS)) source.addEventListener(name, handle(name));
  return () => {
    finished = true;
    source.close();
  };
}
