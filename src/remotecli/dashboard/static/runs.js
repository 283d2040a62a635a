// "Ask": headless runs of a provider (POST /api/runs), without a session to watch. A prompt box
// and Ask (Ctrl+Enter), the answer as it streams in (GET /api/runs/{id}/events: text appended,
// tool uses one compact line each, the usage, then the exit code and duration or the error's
// reason), Stop while it runs (DELETE), the user's runs (GET /api/runs; opening one shows its
// output) and the period's usage against its limits (GET /api/usage).
//
// Everything a run says was written by the CLI in the sandbox, whoever steers it: hostile text.
// It reaches the page only through textContent, Text nodes and the title property, never as
// markup, tool names and inputs included.

import { api, ApiError, followRun, RUN_FINAL_STATES } from "./api.js";
import { button, element } from "./elements.js";

// The provider chosen last, kept for the next visit.
const PROVIDER_KEY = "remotecli.askProvider";
// An answer longer than this is cut in the page (the run keeps all of it): the tab stays usable.
export const SHOWN_CHARS_MAX = 1_000_000;
// A tool use's input is shown on one line, cut here; its title holds the first TOOL_TITLE_MAX.
const TOOL_INPUT_MAX = 160;
const TOOL_TITLE_MAX = 2000;
// How far from the bottom the answer may be scrolled and still follow new text.
const FOLLOW_SLACK_PX = 24;
// The stream says nothing when a queued run starts: while it is queued and silent, the page asks.
const QUEUED_POLL_MS = 1000;

const $ = (id) => document.getElementById(id);
const numbers = new Intl.NumberFormat();

/**
 * Whether `provider` can be asked now: installed, with a headless command, and signed in (a
 * kept sign-in) unless it keeps none (the shell: its "prompt" is a command line, `bash -c`).
 */
export function askable(provider) {
  return (
    provider.available === true &&
    provider.headless === true &&
    (provider.connected === true || provider.signs_in === false)
  );
}

/** A tool use on one line: its name, then its input compacted (JSON, cut to fit). */
export function toolText(name, input) {
  let shown;
  if (typeof input === "string") shown = input;
  else if (input === undefined || input === null) shown = "";
  else {
    try {
      shown = JSON.stringify(input);
    } catch {
      shown = String(input);
    }
  }
  shown = shown.replace(/\s+/g, " ").trim();
  if (shown.length > TOOL_INPUT_MAX) shown = `${shown.slice(0, TOOL_INPUT_MAX - 1)}…`;
  const label = typeof name === "string" && name ? name : "tool";
  return shown ? `${label} ${shown}` : label;
}

/** Seconds as the page says them: "0.4 s", "12 s", "3 min 5 s". */
export function durationText(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "";
  if (seconds < 10) return `${Number.isInteger(seconds) ? seconds : seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const whole = Math.round(seconds);
  return `${Math.floor(whole / 60)} min ${whole % 60} s`;
}

/** A run's tokens in words ("1,234 tokens in, 56 out"), or "" when it has none to tell. */
export function tokensText(tokens) {
  if (!tokens || typeof tokens !== "object") return "";
  const input = tokens.input_tokens;
  const output = tokens.output_tokens;
  if (typeof input !== "number" && typeof output !== "number") return "";
  return `${numbers.format(input ?? 0)} tokens in, ${numbers.format(output ?? 0)} out`;
}

/** How an ended run ended, in words, from its state and the final event (or the run's fields). */
export function endText(state, { exitCode = null, duration = null, reason = null } = {}) {
  const took = durationText(duration);
  const code = typeof exitCode === "number" ? `exit code ${exitCode}` : "";
  const facts = [code, took].filter(Boolean).join(", ");
  const why = reason ? `: ${reason}` : "";
  const how = facts ? ` (${facts})` : "";
  if (state === "cancelled") return `Stopped${why}${how}.`;
  if (state === "failed" || (state !== "done" && reason)) return `Failed${why}${how}.`;
  return `Done${facts ? `: ${facts}` : ""}.`;
}

/** Seconds between two API times (ISO 8601), or null. */
function secondsBetween(start, end) {
  const from = Date.parse(start ?? "");
  const to = Date.parse(end ?? "");
  return Number.isNaN(from) || Number.isNaN(to) ? null : Math.max(0, (to - from) / 1000);
}

/** One figure of the period's usage, with its limit when there is one ("3 of 100 runs"). */
function counted(value, limit, unit) {
  const shown = numbers.format(value ?? 0);
  if (typeof limit !== "number") return `${shown} ${unit}`;
  return `${shown} of ${numbers.format(limit)} ${unit}`;
}

/** The period's usage (GET /api/usage) in one line, with its limits when they are set. */
export function usageText(period) {
  if (!period || typeof period !== "object") return "";
  const limits = period.limits ?? {};
  const tokens = (period.input_tokens ?? 0) + (period.output_tokens ?? 0);
  const one = period.runs === 1 && typeof limits.runs_per_period !== "number";
  const parts = [
    counted(period.runs, limits.runs_per_period, one ? "run" : "runs"),
    counted(tokens, limits.tokens_per_period, "tokens"),
  ];
  if (typeof limits.concurrent_runs === "number") {
    parts.push(`at most ${numbers.format(limits.concurrent_runs)} at once`);
  }
  const ends = timeText(period.period_end);
  const which = ["month", "week", "day"].includes(period.period) ? period.period : "period";
  return `This ${which}: ${parts.join(" · ")}${ends ? ` (renews ${ends})` : ""}`;
}

/** A time from the API in the reader's words: the time alone when it is today. */
export function timeText(iso) {
  const date = new Date(iso ?? "");
  if (Number.isNaN(date.getTime())) return "";
  const today = date.toDateString() === new Date().toDateString();
  return today
    ? date.toLocaleTimeString(undefined, { timeStyle: "short" })
    : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** An API error in words for the Ask panel: the server's message, and when to try again. */
export function askError(error) {
  const message = error instanceof Error ? error.message : String(error);
  const wait = error instanceof ApiError ? error.retryAfter : null;
  // The API's 429 message names the limit and when to retry; say the wait only if it does not.
  if (typeof wait === "number" && !/retry|try again|again in|\bin \d/i.test(message)) {
    return `${message}${/[.!?]$/.test(message) ? "" : "."} Try again in ${durationText(wait)}.`;
  }
  return message;
}

/**
 * The Ask panel in #ask. `actions` are the page's: unauthorised() when the login is refused.
 * The page hands it the providers (setProviders) and asks it to refresh while it is shown.
 */
export class AskPanel {
  constructor(actions) {
    this.actions = actions;
    this.providers = [];
    this.runs = [];
    // The run shown in the answer: its id and state, and how to stop following its stream.
    this.shown = null;
    this.stopStream = null;
    // Counts openings: an answer for a run no longer shown is dropped.
    this.openings = 0;
    this.outputChars = 0;
    this.tail = null;
    $("ask-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.ask();
    });
    $("ask-prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        $("ask-form").requestSubmit();
      }
    });
    $("ask-provider").addEventListener("change", () => {
      localStorage.setItem(PROVIDER_KEY, $("ask-provider").value);
      this.describePrompt();
    });
    $("ask-stop").addEventListener("click", () => this.stop());
  }

  // --- providers -------------------------------------------------------------------------------

  /** The providers from GET /api/providers: the askable ones fill the Provider list. */
  setProviders(providers) {
    const choices = providers.filter(askable);
    const shape = JSON.stringify(choices.map((provider) => [provider.name, provider.title]));
    this.providers = choices;
    const select = $("ask-provider");
    if (select.dataset.shape === shape) return;
    select.dataset.shape = shape;
    const wanted = select.value || localStorage.getItem(PROVIDER_KEY);
    select.replaceChildren(
      ...choices.map((provider) => {
        const option = element("option", provider.title);
        option.value = provider.name;
        return option;
      }),
    );
    if (choices.some((provider) => provider.name === wanted)) select.value = wanted;
    select.disabled = choices.length === 0;
    $("ask-none").hidden = choices.length > 0;
    this.describePrompt();
    this.setRunning(this.shown !== null && !RUN_FINAL_STATES.has(this.shown.state));
  }

  /** Choose `name` in the Provider list (from a card's Ask) and put the cursor in the prompt. */
  choose(name) {
    const select = $("ask-provider");
    if (this.providers.some((provider) => provider.name === name)) {
      select.value = name;
      localStorage.setItem(PROVIDER_KEY, name);
      this.describePrompt();
    }
    $("ask-prompt").focus();
  }

  /** Say what the prompt is for the chosen provider: a command line for the shell. */
  describePrompt() {
    const shell = $("ask-provider").value === "shell";
    $("ask-prompt-label").textContent = shell ? "Command line (run by bash -c)" : "Prompt";
    $("ask-prompt").placeholder = shell
      ? "e.g. ls -la ~ && uname -a"
      : "What should it do? It works in a fresh sandbox of its own.";
  }

  // --- asking ----------------------------------------------------------------------------------

  /** Start a run of the chosen provider with the prompt; show its answer as it comes. */
  async ask() {
    const provider = $("ask-provider").value;
    const prompt = $("ask-prompt").value;
    if (!provider) {
      this.showError("Connect a provider first (or use the shell, which needs no sign-in).");
      return;
    }
    if (!prompt.trim()) {
      this.showError("Write a prompt first.");
      $("ask-prompt").focus();
      return;
    }
    const submit = $("ask-submit");
    submit.disabled = true;
    this.showError("");
    let run;
    try {
      run = await api("POST", "/api/runs", { provider, prompt });
    } catch (error) {
      submit.disabled = false;
      if (error instanceof ApiError && error.status === 401) {
        this.actions.unauthorised();
        return;
      }
      this.showError(askError(error));
      return;
    }
    submit.disabled = false;
    this.putRun(run);
    this.show(run);
    this.refreshUsage();
  }

  /** Stop the shown run (DELETE): its stream then ends with the run cancelled. */
  async stop() {
    const shown = this.shown;
    if (!shown || RUN_FINAL_STATES.has(shown.state)) return;
    const stop = $("ask-stop");
    stop.disabled = true;
    stop.textContent = "Stopping…";
    let run;
    try {
      run = await api("DELETE", `/api/runs/${encodeURIComponent(shown.id)}`);
    } catch (error) {
      stop.disabled = false;
      stop.textContent = "Stop";
      if (error instanceof ApiError && error.status === 401) {
        this.actions.unauthorised();
        return;
      }
      this.showError(`Could not stop the run: ${askError(error)}`);
      return;
    }
    this.putRun(run);
    // The stream tells the end (its final event); a run already over is told here.
    if (this.shown === shown && RUN_FINAL_STATES.has(run.state) && !this.stopStream) {
      this.ended(run);
    }
  }

  showError(text) {
    const note = $("ask-error");
    note.textContent = text;
    note.hidden = !text;
  }

  /** Show Stop (and keep Ask) while the shown run runs. */
  setRunning(running) {
    const stop = $("ask-stop");
    stop.hidden = !running;
    stop.disabled = !running;
    if (running) stop.textContent = "Stop";
    $("ask-submit").disabled = this.providers.length === 0;
  }

  // --- the answer ------------------------------------------------------------------------------

  /** Open `run` in the answer: follow its stream while it runs, else show its whole output. */
  async open(run) {
    if (RUN_FINAL_STATES.has(run.state)) {
      const opening = ++this.openings;
      this.startAnswer(run);
      try {
        run = await api("GET", `/api/runs/${encodeURIComponent(run.id)}`);
      } catch (error) {
        if (opening !== this.openings) return;
        if (error instanceof ApiError && error.status === 401) this.actions.unauthorised();
        else this.setEnd("error", `Could not read this run: ${askError(error)}`);
        return;
      }
      if (opening !== this.openings) return;
      this.putRun(run);
      this.appendText(run.output ?? "");
      this.ended(run);
      return;
    }
    this.show(run);
  }

  /** Show a run that may still be running, from its stream (which replays what came before). */
  show(run) {
    const opening = ++this.openings;
    this.startAnswer(run);
    this.setRunning(true);
    this.stopStream = followRun(
      run.events_path,
      (name, data) => {
        if (opening === this.openings) this.onEvent(run, name, data);
      },
      () => {
        if (opening === this.openings) this.streamLost(run.id);
      },
    );
    if (run.state === "queued") this.watchQueued(run.id, opening);
  }

  /** Ask how a queued run stands until it runs (or another run is shown). */
  watchQueued(runId, opening) {
    setTimeout(async () => {
      if (opening !== this.openings || this.shown?.state !== "queued") return;
      let run;
      try {
        run = await api("GET", `/api/runs/${encodeURIComponent(runId)}`);
      } catch {
        run = null; // the stream tells what happens next; asking again costs little
      }
      if (opening !== this.openings || this.shown?.state !== "queued") return;
      if (run && run.state === "running") this.setState("running");
      else this.watchQueued(runId, opening);
    }, QUEUED_POLL_MS);
  }

  /** Clear the answer and name `run` above it. */
  startAnswer(run) {
    if (this.stopStream) this.stopStream();
    this.stopStream = null;
    this.shown = { id: run.id, state: run.state };
    const output = $("ask-output");
    output.replaceChildren();
    delete output.dataset.cut;
    this.outputChars = 0;
    this.tail = null;
    $("ask-answer").hidden = false;
    $("ask-answer").dataset.runId = run.id;
    $("ask-run-prompt").textContent = run.prompt ?? "";
    $("ask-run-facts").textContent = [run.provider, timeText(run.created_at)]
      .filter(Boolean)
      .join(" · ");
    $("ask-run-usage").textContent = "";
    this.setEnd("", "");
    this.setState(run.state);
    this.setRunning(!RUN_FINAL_STATES.has(run.state));
    this.renderHistory();
  }

  /** The shown run's state, on its badge and in My runs. */
  setState(state) {
    if (this.shown) {
      this.shown.state = state;
      const listed = this.runs.find((run) => run.id === this.shown.id);
      if (listed && listed.state !== state && !RUN_FINAL_STATES.has(listed.state)) {
        listed.state = state;
        this.renderHistory();
      }
    }
    const badge = $("ask-state");
    badge.textContent = state ?? "";
    badge.className = `badge run-${state}`;
    $("ask-answer").dataset.state = state ?? "";
  }

  setEnd(tone, text) {
    const end = $("ask-end");
    end.dataset.tone = tone;
    end.textContent = text;
    end.hidden = !text;
  }

  /** One event of the shown run's stream. */
  onEvent(run, name, data) {
    if (this.shown?.state === "queued") this.setState("running");
    if (name === "text") {
      const said = data;
      this.appendText(typeof said.text === "string" ? said.text : "");
    } else if (name === "tool") {
      const toolUse = data;
      this.appendTool(toolUse.name, toolUse.input);
    } else if (name === "usage") {
      const tokens = data;
      $("ask-run-usage").textContent = tokensText(tokens);
    } else if (name === "done" || name === "error") {
      this.stopStream = null;
      // What the stream says at once; the run's own state (done, failed or cancelled) follows.
      const finish = name === "done" ? data : {};
      const fault = name === "error" ? data : {};
      const state = name === "done" ? (finish.exit_code === 0 ? "done" : "failed") : "failed";
      const facts = {
        exitCode: finish.exit_code ?? null,
        duration: finish.duration_s ?? null,
        reason: fault.reason ?? null,
      };
      this.finish(run.id, state, facts);
      this.settle(run.id, facts);
    }
  }

  /** Show the end of the run `runId` (if it is still the one shown). */
  finish(runId, state, facts) {
    if (this.shown?.id !== runId) return;
    this.setState(state);
    this.setRunning(false);
    this.setEnd(state === "done" ? "ok" : "error", endText(state, facts));
  }

  /** Show an ended run from its own fields (GET /api/runs/{id} or DELETE's answer). */
  ended(run) {
    if (this.shown?.id !== run.id) return;
    const tokens = run.usage;
    if (tokens) $("ask-run-usage").textContent = tokensText(tokens);
    this.finish(run.id, run.state, {
      exitCode: run.exit_code,
      duration: secondsBetween(run.started_at ?? run.created_at, run.ended_at),
      reason: run.reason,
    });
  }

  /** After the final event: the run's state, the list and the usage as the server has them. */
  async settle(runId, facts) {
    let run;
    try {
      run = await api("GET", `/api/runs/${encodeURIComponent(runId)}`);
    } catch {
      this.refresh();
      return;
    }
    this.putRun(run);
    if (RUN_FINAL_STATES.has(run.state)) {
      const tokens = run.usage;
      if (tokens && this.shown?.id === run.id) {
        $("ask-run-usage").textContent = tokensText(tokens);
      }
      this.finish(run.id, run.state, {
        exitCode: run.exit_code ?? facts.exitCode,
        duration: facts.duration ?? secondsBetween(run.started_at, run.ended_at),
        reason: run.reason ?? facts.reason,
      });
    }
    this.refreshUsage();
  }

  /** The stream was refused for good: ask the run itself how it stands. */
  async streamLost(runId) {
    this.stopStream = null;
    let run;
    try {
      run = await api("GET", `/api/runs/${encodeURIComponent(runId)}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        this.actions.unauthorised();
        return;
      }
      if (this.shown?.id === runId) {
        this.setRunning(false);
        this.setEnd("error", `The answer's stream was lost: ${askError(error)}`);
      }
      return;
    }
    this.putRun(run);
    if (this.shown?.id !== runId) return;
    if (RUN_FINAL_STATES.has(run.state)) {
      this.startAnswer(run);
      this.appendText(run.output ?? "");
      this.ended(run);
    } else {
      this.setEnd("error", "The answer's stream was lost; open the run again from My runs.");
    }
  }

  /** Append text the run wrote, as text; the answer follows it when scrolled to the bottom. */
  appendText(text) {
    if (!text) return;
    const output = $("ask-output");
    const room = SHOWN_CHARS_MAX - this.outputChars;
    if (room <= 0) {
      this.markCut();
      return;
    }
    const kept = text.length > room ? text.slice(0, room) : text;
    this.follow(() => {
      if (this.tail && output.lastChild === this.tail) this.tail.appendData(kept);
      else {
        this.tail = document.createTextNode(kept);
        output.append(this.tail);
      }
    });
    this.outputChars += kept.length;
    if (kept.length < text.length) this.markCut();
  }

  /** One line for a tool use: its name and input, as text. */
  appendTool(name, input) {
    const line = element("span", toolText(name, input), "tool-use");
    let full = "";
    try {
      full = typeof input === "string" ? input : JSON.stringify(input, null, 1) ?? "";
    } catch {
      full = "";
    }
    line.title = full.slice(0, TOOL_TITLE_MAX);
    this.follow(() => $("ask-output").append(line));
  }

  markCut() {
    const output = $("ask-output");
    if (output.dataset.cut) return;
    output.dataset.cut = "true";
    const note =
      `The answer is longer than ${numbers.format(SHOWN_CHARS_MAX)} characters: ` +
      "the rest is not shown here.";
    this.follow(() => output.append(element("span", note, "cut")));
  }

  /** Run `change`, then keep the answer scrolled to its end if it was there before. */
  follow(change) {
    const output = $("ask-output");
    const atEnd = output.scrollHeight - output.scrollTop - output.clientHeight <= FOLLOW_SLACK_PX;
    change();
    if (atEnd) output.scrollTop = output.scrollHeight;
  }

  // --- my runs and the usage -------------------------------------------------------------------

  /** Fetch the list of runs and the period's usage (the panel is shown, or a run changed). */
  async refresh() {
    await Promise.all([this.refreshRuns(), this.refreshUsage()]);
  }

  async refreshRuns() {
    try {
      this.runs = await api("GET", "/api/runs");
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) this.actions.unauthorised();
      return; // the page's banner says when the server is not answering
    }
    this.renderHistory();
  }

  async refreshUsage() {
    let period;
    try {
      period = await api("GET", "/api/usage");
    } catch {
      return;
    }
    $("ask-usage").textContent = usageText(period);
  }

  /** Put a run the API answered into the list (first when new). */
  putRun(run) {
    if (this.runs.some((item) => item.id === run.id)) {
      this.runs = this.runs.map((item) => (item.id === run.id ? run : item));
    } else {
      this.runs = [run, ...this.runs];
    }
    this.renderHistory();
  }

  /** Draw My runs; rebuilt only when something shown changed (keeps keyboard focus). */
  renderHistory() {
    const list = $("ask-history");
    const shownId = this.shown?.id ?? null;
    const shape = JSON.stringify([
      this.runs.map((run) => [run.id, run.state, run.prompt, run.provider, run.created_at]),
      shownId,
    ]);
    $("ask-history-empty").hidden = this.runs.length > 0;
    if (list.dataset.shape === shape) return;
    list.dataset.shape = shape;
    const focused = document.activeElement?.closest?.("#ask-history li")?.dataset.runId ?? null;
    list.replaceChildren(...this.runs.map((run) => this.historyItem(run, shownId)));
    if (focused) list.querySelector(`li[data-run-id="${CSS.escape(focused)}"] button`)?.focus();
  }

  historyItem(run, shownId) {
    const item = element("li", undefined, "run");
    item.dataset.runId = run.id;
    item.dataset.state = run.state;
    const open = button(undefined, () => this.open(run), { className: "run-open" });
    if (run.id === shownId) open.setAttribute("aria-current", "true");
    const firstLine = (run.prompt ?? "").split("\n", 1)[0];
    open.append(element("span", firstLine || "(empty prompt)", "run-prompt"));
    const facts = element("span", undefined, "run-facts");
    const time = element("time", timeText(run.created_at));
    if (run.created_at) time.dateTime = run.created_at;
    facts.append(
      element("span", run.provider ?? ""),
      time,
      element("span", run.state ?? "", `badge run-${run.state}`),
    );
    open.append(facts);
    open.title = run.prompt ?? "";
    item.append(open);
    return item;
  }

  /** Forget everything shown (signed out). */
  clear() {
    this.openings += 1;
    if (this.stopStream) this.stopStream();
    this.stopStream = null;
    this.shown = null;
    this.runs = [];
    $("ask-output").replaceChildren();
    $("ask-answer").hidden = true;
    $("ask-prompt").value = "";
    $("ask-usage").textContent = "";
    this.showError("");
    this.setRunning(false);
    this.renderHistory();
  }
}
