// What both views (the desktop, viewer.js, and the text view, terminal.js) do when their
// WebSocket drops: ask the session's state, say in words what happened, and decide whether to
// try again, and after how long. The browser reports only 1006 for a refused upgrade, so the
// session's state decides, not the close code.

import { api, ApiError, endedMessage, FINAL_STATES, NOT_AUTHORISED, UNREACHABLE } from "./api.js";

/** The waits before each reconnection attempt; the last one repeats. */
export const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];

/** The wait before attempt number `attempt` (0 for the first retry). */
export function backoff(attempt) {
  return BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
}

/**
 * Decide what happened to a view of `sessionId` that closed (`close`: {code, reason}) or could
 * not open (`error`). Resolves with {text, retry}: `retry` true to try again, false when the
 * session is over, null when the login is refused (trying again cannot help).
 */
export async function explainDrop(sessionId, close, error, what = "the session's display") {
  let session = null;
  try {
    session = await api("GET", `/api/sessions/${encodeURIComponent(sessionId)}`);
  } catch (failure) {
    if (failure instanceof ApiError) {
      if (failure.status === 0) return { text: UNREACHABLE, retry: true };
      if (failure.status === 401) return { text: NOT_AUTHORISED, retry: null };
      if (failure.status === 404) {
        return { text: "The session ended: it no longer exists on the server.", retry: false };
      }
      if (failure.status >= 500) return { text: failure.message, retry: true };
    }
    return { text: String(failure.message ?? failure), retry: true };
  }
  const state = session.state;
  if (FINAL_STATES.has(state) || state === "stopping") {
    return { text: endedMessage(state, session.reason), retry: false };
  }
  if (error instanceof ApiError) {
    if (error.status === 409) return { text: "The session is not ready yet.", retry: true };
    if (error.status === 401 || error.status === 403) {
      return { text: NOT_AUTHORISED, retry: null };
    }
    return { text: error.message, retry: true };
  }
  if (error) return { text: `The viewer could not start: ${error.message}`, retry: null };
  if (close?.code === 1001) {
    return { text: "The server is restarting or shutting down.", retry: true };
  }
  if (close?.code === 1011 || close?.code === 1008) {
    const why = close.reason ? `: ${close.reason}` : "";
    return { text: `The server closed the live view${why}.`, retry: true };
  }
  if (close?.reason) return { text: `The live view closed: ${close.reason}.`, retry: true };
  return { text: `The connection to ${what} was lost.`, retry: true };
}
