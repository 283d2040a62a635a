// The controller's HTTP API as the dashboard uses it: JSON calls, the SSE stream, and errors in
// words. Calls go to the same origin with the login cookie; nothing here touches the page.

/** An API call that failed; `status` is 0 when the server could not be reached at all. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
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
    throw new ApiError(response.status, describeFailure(response.status, data, text));
  }
  return data;
}

/** Turn an error response into a sentence, preferring the server's own explanation. */
function describeFailure(status, data, text) {
  if (status === 401) return NOT_AUTHORISED;
  const detail = data && (data.detail ?? data.message ?? data.error);
  let message = "";
  if (typeof detail === "string") message = detail;
  else if (detail && typeof detail.message === "string") message = detail.message;
  else if (Array.isArray(detail)) message = detail.map((item) => item.msg ?? "").join("; ");
  else if (!data && text && text.length < 300) message = text.trim();
  if (status === 502 || status === 503 || status === 504) {
    return message || `The server is not answering (HTTP ${status}); try again in a moment.`;
  }
  return message || `The server refused the request (HTTP ${status}).`;
}

/** Accept either a bare JSON list or an object holding the list under `key`. */
export function listOf(data, key) {
  if (Array.isArray(data)) return data;
  if (data && Array.isArray(data[key])) return data[key];
  return [];
}

/** The states after which a session never runs again. */
export const FINAL_STATES = new Set(["stopped", "failed"]);

/** The state and reason carried by a session object or an SSE event payload. */
export function sessionFacts(data) {
  const session = data && typeof data.session === "object" && data.session ? data.session : data;
  return {
    state: session?.state ?? data?.state ?? null,
    reason: session?.reason ?? data?.reason ?? null,
    message: data?.message ?? data?.step ?? data?.progress ?? data?.detail ?? null,
  };
}

/** Explain in words why a session is over, from its state and reason. */
export function endedMessage(state, reason) {
  if (state === "failed") {
    return `The session ended: it failed${reason ? ` (${reason})` : ""}.`;
  }
  return `The session ended: it was stopped${reason ? ` (${reason})` : ""}.`;
}

const EVENT_NAMES = ["message", "state", "progress", "session", "status", "ready", "failed"];

/**
 * Follow a session's event stream; call `onEvent(facts, raw)` for each event.
 * Returns a function that closes the stream. The stream is closed by itself once the session
 * reaches a final state (the browser would otherwise reconnect to it forever).
 */
export function followEvents(sessionId, onEvent, onBroken) {
  const source = new EventSource(`/api/sessions/${encodeURIComponent(sessionId)}/events`);
  const handle = (event) => {
    let data = null;
    try {
      data = JSON.parse(event.data);
    } catch {
      data = { message: event.data };
    }
    const facts = sessionFacts(data);
    if (facts.state && FINAL_STATES.has(facts.state)) source.close();
    onEvent(facts, data, event.type);
  };
  for (const name of EVENT_NAMES) source.addEventListener(name, handle);
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) onBroken();
  });
  return () => source.close();
}
