// The wavecast demo page: connect, pick a model, generate, listen while it
// generates. Protocol: protocol/PROTOCOL.md; messages via ./protocol.js.
// Modules: connection.js (the socket), form.js (the request form), card.js
// (a generation and its transport), player.js + worklet.js (playback).
import { Connection, auth } from "./connection.js";
import { Card } from "./card.js";
import { audioContext, pauseCurrent, playback } from "./player.js";
import { readSettingsLink } from "./code.js";
import * as history from "./history.js";
import {
  applySettings, clearFieldErrors, currentBitrate, currentFormat, currentInputs, currentModel,
  currentSampleRate, form, readParams, renderModels, renderParams, showFieldError, updateEstimate,
  wireDialogue, wireFormats, wireSpeakers, wireUploads,
} from "./form.js";

const $ = (sel) => document.querySelector(sel);

// State visible to the end-to-end tests (tests/browser) and to curious users.
const state = {
  connected: false,
  hello: null,
  cards: new Map(), // id -> Card
  saving: 0, // history writes (saves, removals) not yet done
};
window.wavecast = state;
state.history = history; // its limits, for the tests

let counter = 0;

// One polite live region for what matters (a card completed, failed), not every
// changing number.
function announce(text) {
  const region = $("#announcer");
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 50);
}

const hooks = {
  send: (message, socket) => connection.send(message, socket),
  announce,
  ended: (card) => {
    if (typing?.card === card) stopTyping();
    updateClear();
  },
  removed: (card) => {
    if (typing?.card === card) stopTyping();
    state.cards.delete(card.id);
    updateClear();
    state.saving += 1;
    history.remove(card.id).catch(() => {}).finally(() => { state.saving -= 1; });
  },
  finished: (card) => {
    // Kept for the next visit; the oldest kept clips make room (they stay on
    // this page until it is closed).
    state.saving += 1;
    history.save(card.entry())
      .catch((err) => console.warn("history unavailable", err))
      .finally(() => { state.saving -= 1; });
  },
  rerun: (settings) => {
    applySettings(settings);
    const missing = settings.inputs.filter((role) => !form.uploads[role]);
    if (missing.length) {
      $("#form-error").textContent = `This request used an uploaded clip (${missing.join(", ")}): choose it again, then Generate.`;
      $("#compose").scrollIntoView?.({ block: "start" });
      return;
    }
    $("#compose").requestSubmit();
  },
  load: (settings) => {
    applySettings(settings);
    $("#prompt").focus();
    $("#compose").scrollIntoView?.({ block: "start" });
  },
  reuseSeed: (seed) => {
    const input = $("#param-seed");
    if (input) input.value = String(seed);
  },
};

function updateClear() {
  $("#clear-cards").hidden = ![...state.cards.values()].some((card) => card.ended);
}

// Speech written as it is spoken ("Speak as I type"): the card its text goes to,
// and the text box's value as far as it was sent.
let typing = null;

function stopTyping() {
  typing = null;
  $("#generate").firstChild.textContent = "Generate ";
}

// What was added at the end of the text box goes to the card (an edit before
// it cannot be taken back: the text from there on is what is sent next).
function sendTyped() {
  if (!typing) return;
  const value = $("#prompt").value;
  const added = value.startsWith(typing.sent) ? value.slice(typing.sent.length) : "";
  typing.sent = value;
  if (added) typing.card.sendText(added);
}

function submit(event) {
  event?.preventDefault();
  if (typing) {
    // "End text": the rest of it, and its end.
    sendTyped();
    typing.card.sendText("", true);
    stopTyping();
    return;
  }
  const model = currentModel();
  clearFieldErrors();
  if (!model || !state.connected) {
    $("#form-error").textContent = "Not connected to the server.";
    return;
  }
  let params;
  try {
    params = readParams();
  } catch (err) {
    $("#form-error").textContent = err.message;
    return;
  }
  // Audio output may only start after a user gesture: this click is one (the
  // stream plays at the rate asked for, else the model's).
  const rate = currentSampleRate();
  audioContext(rate || model.sample_rate).then((ctx) => ctx.resume()).catch(() => {});
  const id = `w${++counter}-${Math.random().toString(36).slice(2, 8)}`;
  const asTyped = $("#as-typed").checked && (model.capabilities || []).includes("text_stream");
  const prompt = asTyped ? $("#prompt").value : $("#prompt").value.trim();
  const inputs = currentInputs();
  // PCM as made, or a file of an encoded format the page decodes as it comes.
  const format = currentFormat();
  const bitrate = format ? currentBitrate() : null;
  const card = new Card({ id, model, prompt, params, inputs, rate, format, bitrate }, hooks);
  state.cards.set(id, card);
  const message = { type: "generate", id, model: model.name, prompt, params, format: format || "pcm_f32le" };
  if (rate) message.sample_rate = rate;
  if (bitrate) message.bitrate = bitrate;
  if (Object.keys(inputs).length) message.inputs = inputs;
  // Streams come with their codes where the model sends them: a stream cut
  // under way is picked up from them (PROTOCOL.md §3.1 resume_codes; a typed
  // one where it is cut a sentence a chunk, §3.4).
  const pickable = !asTyped || params.chunk_method === "sentence";
  if ((model.capabilities || []).includes("codes") && pickable) message.codes = true;
  if (asTyped) message.text_stream = true;
  // Speech says which text it speaks: the card shows it as it plays (§4.9).
  if ((model.capabilities || []).includes("captions")) message.captions = true;
  card.request = message;
  card.sendRequest();
  if (asTyped) {
    typing = { card, sent: $("#prompt").value };
    $("#generate").firstChild.textContent = "End text ";
  }
}

// A request refused for one of its fields, before it started: the form says
// what to fix, at the field, and the empty card goes.
function refusedAtField(card, message) {
  const err = message.error;
  if (!err || err.code !== "invalid_field" || card.frames > 0 || card.startedAt !== null) return false;
  if (!showFieldError(err.field, err.message)) return false;
  card.remove();
  return true;
}

// -- wiring -----------------------------------------------------------------------

function onMessage(message, socket) {
  if (message.type === "hello") {
    if (socket !== connection.ws) return; // (not the connection new requests go on)
    const first = state.hello === null;
    state.hello = form.hello = message;
    renderModels(message.models);
    $("#generate").disabled = message.models.length === 0;
    // A link with settings in it fills the form, once.
    const linked = first ? readSettingsLink(location.hash) : null;
    if (linked) applySettings(linked);
    // Connected again: what waited for it is asked again (card.js).
    for (const card of state.cards.values()) card.resend();
    return;
  }
  if (message.type === "error" && !(message.id && state.cards.has(message.id))) {
    $("#form-error").textContent = `${message.message} (${message.code})`;
    return;
  }
  const card = state.cards.get(message.id);
  if (!card || (card.socket !== null && card.socket !== socket)) return; // (sent again elsewhere)
  switch (message.type) {
    case "queued":
      card.setStatus("queued", `queued #${message.position}`);
      break;
    case "started":
      card.onStarted(message);
      break;
    case "audio":
      card.onAudio(message);
      break;
    case "progress":
      card.onProgress(message);
      break;
    case "waiting":
      card.onWaiting(message);
      break;
    case "caption":
      card.onCaption(message);
      break;
    case "done":
      if (message.status === "error" && refusedAtField(card, message)) break;
      // The server is shutting down: new requests on a new connection.
      if (message.error?.code === "shutting_down") connection.renew(socket);
      if (card.waitForRoom(message)) break;
      if (typing?.card === card) stopTyping();
      card.onDone(message).then(updateClear);
      break;
    case "error":
      card.showError(message.code, message.message);
      break;
  }
}

// Why the server closed the connection (its close frame's reason), if it said:
// at its connection limit (1013) it is full, and the page tries again.
function closedWhy(event) {
  if (event && event.code === 1013) return `the server is full: ${event.reason || "too many connections"}`;
  return (event && event.reason) || "";
}

function onConnState(status, event, socket) {
  state.connected = status === "open";
  const conn = $("#conn");
  conn.dataset.state = status;
  const why = status === "disconnected" ? closedWhy(event) : "";
  $("#conn-text").textContent = {
    connecting: "connecting…",
    open: "connected",
    disconnected: event && event.code === 1013 ? `${why} — trying again…`
      : why ? `disconnected (${why}) — reconnecting…` : "disconnected — reconnecting…",
    key: auth.key ? "that API key was refused" : "needs an API key",
  }[status];
  $("#key-box").hidden = status !== "key";
  if (status === "key") $("#api-key").focus();
  $("#generate").disabled = !state.connected;
  if (status === "disconnected") lost(socket, why);
}

// A connection closed: its cards not started wait to be asked again (at once,
// where the page has another connection open), the others end.
function lost(socket, why) {
  for (const card of state.cards.values()) {
    if (card.awaiting || card.ended || card.socket !== socket) continue;
    if (card.mayAskAgain()) {
      card.awaitConnection(why ? `connection lost: ${why}` : "connection lost");
      if (connection.open) card.resend();
    } else {
      const message = `the connection to the server was lost${why ? ` (${why})` : ""}`;
      if (typing?.card === card) stopTyping();
      card.onDone({ status: "error", error: { code: "disconnected", message } }).then(updateClear);
    }
  }
  updateClear();
}

const connection = new Connection(onMessage, onConnState, (socket, event) => lost(socket, closedWhy(event)));
$("#key-box").addEventListener("submit", (event) => {
  event.preventDefault();
  auth.set($("#api-key").value.trim());
  $("#api-key").value = "";
  connection.connect();
});

wireUploads();
wireFormats();
wireDialogue();
wireSpeakers(pauseCurrent);
const compose = $("#compose");
compose.addEventListener("submit", submit);
// Ctrl+Enter submits through the browser's own checks (ranges, required);
// a plain Enter in a field does not start a generation.
compose.addEventListener("keydown", (event) => {
  if (event.key !== "Enter") return;
  if (event.ctrlKey || event.metaKey) {
    event.preventDefault();
    compose.requestSubmit();
  } else if (event.target instanceof HTMLInputElement) {
    event.preventDefault();
  }
});
$("#model").addEventListener("change", () => { clearFieldErrors(); renderParams(); });
$("#prompt").addEventListener("input", sendTyped);
$("#as-typed").addEventListener("change", (event) => {
  $("#prompt").required = !event.target.checked;
  // Typed text is said a sentence a chunk (cut the same however it is typed, a
  // caption a sentence), unless the user chose how to split it.
  const select = $("#param-chunk_method");
  if (!select || select.dataset.touched || ![...select.options].some((o) => o.value === "sentence")) return;
  if (event.target.checked) {
    select.dataset.before = select.value;
    select.value = "sentence";
  } else if (select.value === "sentence" && select.dataset.before) {
    select.value = select.dataset.before;
  }
});
$("#play-together").addEventListener("change", (event) => {
  playback.together = event.target.checked;
});
$("#clear-cards").addEventListener("click", () => {
  for (const card of [...state.cards.values()]) if (card.ended) card.remove();
});
updateEstimate();

// Clips kept from earlier visits, newest on top.
async function restoreHistory() {
  let entries;
  try {
    entries = await history.all();
  } catch (err) {
    console.warn("history unavailable", err);
    return;
  }
  for (const entry of entries) {
    if (state.cards.has(entry.id)) continue;
    const card = new Card({ ...entry, scroll: false }, hooks);
    card.restore(entry);
    state.cards.set(entry.id, card);
  }
  // Newer live cards stay above the restored ones.
  const live = [...state.cards.values()].filter((card) => !card.el.dataset.restored);
  for (const card of live) $("#cards").prepend(card.el);
  updateClear();
  state.restored = true;
}
restoreHistory();
// A settings link opened in this tab fills the form too.
window.addEventListener("hashchange", () => {
  const linked = readSettingsLink(location.hash);
  if (linked && state.hello) applySettings(linked);
});
