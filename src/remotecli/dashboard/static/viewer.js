// The live view: one noVNC RFB client at a time, reconnected with backoff while its session is
// alive, and every drop explained in words from the close code, its reason and the session's
// state (the browser only ever reports 1006 for a refused upgrade, so the state decides).

import { api, ApiError, endedMessage, FINAL_STATES, NOT_AUTHORISED, UNREACHABLE } from "./api.js";

const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];
// Raw, CopyRect, RRE, Hextile, Zlib, Tight, ZRLE, JPEG, H.264, TightPNG: rectangles of pixels.
const PIXEL_ENCODINGS = new Set([0, 1, 2, 5, 6, 7, 16, 21, 50, -260]);

/**
 * Connects the screen element to sessions. Events: "status" (detail {tone, text}),
 * "clipboard" (detail {text}), "firstframe", "ended" (detail {text}).
 */
export class Viewer extends EventTarget {
  constructor(screen, loadRfb) {
    super();
    this.screen = screen;
    this.loadRfb = loadRfb;
    this.rfb = null;
    this.sessionId = null;
    this.wanted = false;
    this.attempt = 0;
    this.generation = 0;
    this.retryTimer = null;
    this.lastClose = null;
  }

  get connected() {
    return this.rfb !== null && this.rfb.__connected === true;
  }

  /** Show `sessionId` in the screen element, replacing any session shown before. */
  async connect(sessionId) {
    this.disconnect();
    this.sessionId = sessionId;
    this.wanted = true;
    this.attempt = 0;
    await this.open();
  }

  /** Stop showing the session (the session itself keeps running). */
  disconnect() {
    this.wanted = false;
    this.generation += 1;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const rfb = this.rfb;
    this.rfb = null;
    if (rfb) rfb.disconnect();
    this.screen.dataset.firstFrame = "";
  }

  focus() {
    if (this.rfb) this.rfb.focus();
  }

  sendClipboard(text) {
    if (this.rfb) this.rfb.clipboardPasteFrom(text);
  }

  status(tone, text) {
    this.dispatchEvent(new CustomEvent("status", { detail: { tone, text } }));
  }

  async open() {
    const generation = this.generation;
    const sessionId = this.sessionId;
    this.status(this.attempt ? "reconnecting" : "connecting", "Opening the live view…");
    let RFB;
    let ticket;
    try {
      RFB = await this.loadRfb();
      ticket = await api("POST", `/api/sessions/${encodeURIComponent(sessionId)}/ticket`);
    } catch (error) {
      if (generation === this.generation) await this.dropped(generation, { error });
      return;
    }
    if (generation !== this.generation) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}${ticket.vnc_path}`;
    const socket = new WebSocket(url, ["binary"]);
    socket.addEventListener("close", (event) => {
      this.lastClose = { code: event.code, reason: event.reason };
    });
    this.lastClose = null;
    const rfb = new RFB(this.screen, socket, { shared: true });
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.focusOnClick = true;
    this.rfb = rfb;
    this.watchFirstFrame(rfb);
    rfb.addEventListener("connect", () => {
      if (generation !== this.generation) return;
      rfb.__connected = true;
      this.attempt = 0;
      this.status("connected", "Connected: click the screen or press Focus keyboard to type.");
      rfb.focus();
    });
    rfb.addEventListener("disconnect", () => {
      rfb.__connected = false;
      if (generation === this.generation) this.dropped(generation, { close: this.lastClose });
    });
    rfb.addEventListener("securityfailure", (event) => {
      this.lastClose = { code: 0, reason: `VNC security failure: ${event.detail.reason ?? ""}` };
    });
    rfb.addEventListener("clipboard", (event) => {
      this.dispatchEvent(new CustomEvent("clipboard", { detail: { text: event.detail.text } }));
    });
  }

  // noVNC has no public "first framebuffer drawn" event: wrap the two methods that handle one
  // rectangle and finish one update, so the page (and the benchmark) learn when the first
  // update carrying pixels (not only a desktop size or a cursor) is on screen.
  watchFirstFrame(rfb) {
    const handleRect = rfb._handleRect;
    const framebufferUpdate = rfb._framebufferUpdate;
    if (typeof handleRect !== "function" || typeof framebufferUpdate !== "function") return;
    const viewer = this;
    let pixels = false;
    rfb._handleRect = function (...args) {
      const encoding = this._FBU.encoding;
      const done = handleRect.apply(this, args);
      if (done && PIXEL_ENCODINGS.has(encoding)) pixels = true;
      return done;
    };
    rfb._framebufferUpdate = function (...args) {
      const done = framebufferUpdate.apply(this, args);
      if (done && pixels && viewer.rfb === rfb && viewer.screen.dataset.firstFrame !== "drawn") {
        viewer.screen.dataset.firstFrame = "drawn";
        viewer.dispatchEvent(new Event("firstframe"));
      }
      return done;
    };
  }

  async dropped(generation, { close = null, error = null }) {
    if (this.rfb) this.rfb.__connected = false;
    this.rfb = null;
    this.screen.dataset.firstFrame = "";
    if (!this.wanted) {
      this.status("idle", "Disconnected from the session (it keeps running).");
      return;
    }
    const { text, retry } = await this.explain(close, error);
    if (generation !== this.generation) return;
    if (!retry) {
      this.wanted = false;
      this.status(retry === null ? "error" : "ended", text);
      this.dispatchEvent(new CustomEvent("ended", { detail: { text } }));
      return;
    }
    const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    const seconds = (delay / 1000).toFixed(1);
    this.status("reconnecting", `${text} Reconnecting in ${seconds} s (attempt ${this.attempt})…`);
    this.retryTimer = setTimeout(() => {
      if (generation === this.generation && this.wanted) this.open();
    }, delay);
  }

  /** Decide what happened: `retry` true to try again, false when over, null when refused. */
  async explain(close, error) {
    let session = null;
    try {
      session = await api("GET", `/api/sessions/${encodeURIComponent(this.sessionId)}`);
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
    return { text: "The connection to the session's display was lost.", retry: true };
  }
}
