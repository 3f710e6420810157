// The chat webview's page script: renders the transcript the extension sends and posts the
// user's actions back (ChatViewProvider in ../chat.ts handles them).
import type { FromWebview, ToWebview, Turn } from "../chat";
import { renderMarkdown } from "./markdown";

declare function acquireVsCodeApi(): { postMessage(message: FromWebview): void };

const vscode = acquireVsCodeApi();
const transcript = document.getElementById("transcript") as HTMLElement;
const form = document.getElementById("ask") as HTMLFormElement;
const question = document.getElementById("question") as HTMLTextAreaElement;
const send = document.getElementById("send") as HTMLButtonElement;
const stop = document.getElementById("stop") as HTMLButtonElement;
const clear = document.getElementById("clear") as HTMLButtonElement;

/** The reply being streamed: its element and the markdown received so far. */
let streaming: { body: HTMLElement; text: string } | undefined;

function turnElement(turn: Turn): { element: HTMLElement; body: HTMLElement } {
  const element = document.createElement("section");
  element.className = `turn ${turn.role}`;
  const header = document.createElement("header");
  header.textContent = turn.role === "user" ? "You" : "StableLM";
  if (turn.contextLabel) {
    const context = document.createElement("span");
    context.className = "context";
    context.textContent = turn.contextLabel;
    header.append(" ", context);
  }
  const body = document.createElement("div");
  body.className = "body";
  element.append(header, body);
  fill(body, turn);
  return { element, body };
}

function fill(body: HTMLElement, turn: Turn): void {
  if (turn.role === "user") {
    body.textContent = turn.text;
  } else {
    body.innerHTML = renderMarkdown(turn.text);
  }
  if (turn.note) {
    const note = document.createElement("p");
    note.className = turn.note.startsWith("error") ? "note error" : "note";
    note.textContent = `(${turn.note})`;
    body.append(note);
  }
}

function append(turn: Turn): HTMLElement {
  const { element, body } = turnElement(turn);
  transcript.append(element);
  element.scrollIntoView({ block: "end" });
  return body;
}

function setBusy(busy: boolean): void {
  send.hidden = busy;
  stop.hidden = !busy;
  if (busy && !streaming) {
    streaming = { body: append({ role: "assistant", text: "" }), text: "" };
  }
}

window.addEventListener("message", (event: MessageEvent<ToWebview>) => {
  const message = event.data;
  switch (message.type) {
    case "history": {
      transcript.replaceChildren();
      streaming = undefined;
      const turns = message.turns;
      // While busy, the last turn is the reply being streamed.
      const last = message.busy ? turns[turns.length - 1] : undefined;
      for (const turn of message.busy ? turns.slice(0, -1) : turns) append(turn);
      if (last) streaming = { body: append(last), text: last.text };
      setBusy(message.busy);
      break;
    }
    case "turn":
      append(message.turn);
      break;
    case "busy":
      setBusy(message.busy);
      break;
    case "delta":
      if (streaming) {
        streaming.text += message.delta;
        streaming.body.innerHTML = renderMarkdown(streaming.text);
        streaming.body.scrollIntoView({ block: "end" });
      }
      break;
    case "end":
      if (streaming) {
        fill(streaming.body, message.turn);
        streaming = undefined;
      } else {
        append(message.turn);
      }
      break;
  }
});

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = question.value.trim();
  if (!text || !stop.hidden) return;
  vscode.postMessage({ type: "ask", text });
  question.value = "";
});

question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

stop.addEventListener("click", () => vscode.postMessage({ type: "stop" }));
clear.addEventListener("click", () => vscode.postMessage({ type: "clear" }));

// Copy and Insert buttons of code blocks (rendered by markdown.ts).
transcript.addEventListener("click", (event) => {
  const button = (event.target as HTMLElement).closest<HTMLButtonElement>("button[data-action]");
  const code = button?.closest(".code-block")?.querySelector("code");
  if (!button || !code) return;
  const text = code.textContent ?? "";
  vscode.postMessage(button.dataset.action === "insert" ? { type: "insert", text } : { type: "copy", text });
});

vscode.postMessage({ type: "ready" });
