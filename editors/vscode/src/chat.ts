// The chat view: a webview in the side bar. The conversation lives here (the webview is recreated
// each time the view is shown again); each question is one `stablelm.chat` request carrying the
// whole conversation plus the current file and selection as context.
import { randomUUID } from "crypto";
import * as path from "path";
import * as vscode from "vscode";
import { ChatContext, ChatDelta, ChatMessage, ChatParams, ChatResult, RequestCancelled } from "./protocol";

/** Messages the webview posts to the extension. */
export type FromWebview =
  | { type: "ready" }
  | { type: "ask"; text: string }
  | { type: "stop" }
  | { type: "clear" }
  | { type: "copy"; text: string }
  | { type: "insert"; text: string };

/** A turn as the webview shows it. */
export interface Turn {
  role: "user" | "assistant";
  text: string;
  /** For a question: which file and lines went with it. */
  contextLabel?: string;
  /** For a reply: stopped by the user, or failed. */
  note?: string;
}

/** Messages the extension posts to the webview. */
export type ToWebview =
  | { type: "history"; turns: Turn[]; busy: boolean }
  | { type: "turn"; turn: Turn }
  | { type: "delta"; delta: string }
  | { type: "end"; turn: Turn }
  | { type: "busy"; busy: boolean };

/** What the session needs from the server. */
export interface ChatServer {
  chat(params: ChatParams, token: vscode.CancellationToken): Promise<ChatResult>;
  onChatDelta(listener: (delta: ChatDelta) => void): vscode.Disposable;
}

/** The editor the question is about: the file, and the selection when there is one. */
export interface EditorContext {
  context: ChatContext;
  label: string;
}

export function editorContext(editor: vscode.TextEditor | undefined): EditorContext | undefined {
  if (!editor) return undefined;
  const document = editor.document;
  const name = document.isUntitled ? document.uri.path : path.basename(document.uri.fsPath);
  const selection = editor.selection;
  if (selection.isEmpty) {
    return { context: { uri: document.uri.toString() }, label: name };
  }
  const range = {
    start: { line: selection.start.line, character: selection.start.character },
    end: { line: selection.end.line, character: selection.end.character },
  };
  const lines = range.start.line === range.end.line ? `${range.start.line + 1}` : `${range.start.line + 1}-${range.end.line + 1}`;
  return { context: { uri: document.uri.toString(), range }, label: `${name}:${lines}` };
}

function isCancelled(error: unknown): boolean {
  return typeof error === "object" && error !== null && (error as { code?: unknown }).code === RequestCancelled;
}

/** One conversation: the transcript, the request in flight, and what the webview is told. */
export class ChatSession implements vscode.Disposable {
  /** What the webview shows. */
  private readonly transcript: Turn[] = [];
  /** What the model is sent: questions with the replies they got. */
  private readonly history: ChatMessage[] = [];
  /** Incremented by clear(), so a reply that arrives afterwards is dropped. */
  private conversation = 0;
  private pending: { chatId: string; text: string; cancel: vscode.CancellationTokenSource } | undefined;
  private readonly deltaListener: vscode.Disposable;

  constructor(
    private readonly server: ChatServer,
    private readonly post: (message: ToWebview) => void,
  ) {
    this.deltaListener = server.onChatDelta(({ chatId, delta }) => {
      if (this.pending?.chatId !== chatId) return;
      this.pending.text += delta;
      this.post({ type: "delta", delta });
    });
  }

  get busy(): boolean {
    return this.pending !== undefined;
  }

  /** The transcript so far, with the reply being streamed, for a webview that was just created. */
  replay(): void {
    const turns = this.pending ? [...this.transcript, { role: "assistant" as const, text: this.pending.text }] : [...this.transcript];
    this.post({ type: "history", turns, busy: this.busy });
  }

  /** Asks `question`; resolves when the reply is complete, stopped or failed. */
  async ask(question: string, editor: EditorContext | undefined): Promise<void> {
    const text = question.trim();
    if (!text || this.pending) return;
    const questionTurn: Turn = { role: "user", text, contextLabel: editor?.label };
    this.transcript.push(questionTurn);
    this.post({ type: "turn", turn: questionTurn });

    const pending = { chatId: randomUUID(), text: "", cancel: new vscode.CancellationTokenSource() };
    const conversation = this.conversation;
    this.pending = pending;
    this.post({ type: "busy", busy: true });
    const messages: ChatMessage[] = [...this.history, { role: "user", content: text }];
    let reply: Turn;
    try {
      const result = await this.server.chat({ chatId: pending.chatId, messages, context: editor?.context }, pending.cancel.token);
      // The result's text is authoritative; the streamed deltas were a preview of it.
      reply = { role: "assistant", text: result.text, note: result.finishReason === "cancelled" ? "stopped" : undefined };
    } catch (error) {
      const note = isCancelled(error) ? "stopped" : `error: ${error instanceof Error ? error.message : String(error)}`;
      reply = { role: "assistant", text: pending.text, note };
    } finally {
      pending.cancel.dispose();
      this.pending = undefined;
    }
    if (conversation !== this.conversation) {
      // Cleared while the reply was generated: it belongs to a conversation that is gone.
      this.post({ type: "busy", busy: false });
      return;
    }
    this.transcript.push(reply);
    // A turn without a reply stays on screen but is not sent again: the next request keeps
    // alternating user and assistant messages, which chat templates expect.
    if (reply.text) {
      this.history.push({ role: "user", content: text }, { role: "assistant", content: reply.text });
    }
    this.post({ type: "end", turn: reply });
    this.post({ type: "busy", busy: false });
  }

  stop(): void {
    this.pending?.cancel.cancel();
  }

  clear(): void {
    this.stop();
    this.transcript.length = 0;
    this.history.length = 0;
    this.conversation += 1;
    this.post({ type: "history", turns: [], busy: this.busy });
  }

  dispose(): void {
    this.stop();
    this.deltaListener.dispose();
  }
}

export class ChatViewProvider implements vscode.WebviewViewProvider, vscode.Disposable {
  static readonly viewType = "stablelm.chat";
  private view: vscode.WebviewView | undefined;
  private readonly session: ChatSession;
  /** The chat view takes the focus from the editor: remember the last text editor. */
  private lastEditor: vscode.TextEditor | undefined = vscode.window.activeTextEditor;
  private readonly disposables: vscode.Disposable[] = [];

  constructor(
    private readonly extensionUri: vscode.Uri,
    server: ChatServer,
  ) {
    this.session = new ChatSession(server, (message) => void this.view?.webview.postMessage(message));
    this.disposables.push(
      this.session,
      vscode.window.onDidChangeActiveTextEditor((editor) => {
        if (editor) this.lastEditor = editor;
      }),
    );
  }

  resolveWebviewView(view: vscode.WebviewView): void {
    this.view = view;
    const dist = vscode.Uri.joinPath(this.extensionUri, "out", "dist");
    const media = vscode.Uri.joinPath(this.extensionUri, "media");
    view.webview.options = { enableScripts: true, localResourceRoots: [dist, media] };
    view.webview.html = chatHtml(view.webview, vscode.Uri.joinPath(dist, "chat.js"), vscode.Uri.joinPath(media, "chat.css"));
    const listener = view.webview.onDidReceiveMessage((message: FromWebview) => this.receive(message));
    view.onDidDispose(() => {
      listener.dispose();
      if (this.view === view) this.view = undefined;
    });
  }

  private receive(message: FromWebview): void {
    switch (message.type) {
      case "ready":
        this.session.replay();
        break;
      case "ask":
        void this.session.ask(message.text, editorContext(this.editor()));
        break;
      case "stop":
        this.session.stop();
        break;
      case "clear":
        this.session.clear();
        break;
      case "copy":
        void vscode.env.clipboard.writeText(message.text);
        break;
      case "insert":
        void this.insert(message.text);
        break;
    }
  }

  private editor(): vscode.TextEditor | undefined {
    const editor = vscode.window.activeTextEditor ?? this.lastEditor;
    // A closed editor's document is closed too: don't send a URI the server no longer has.
    return editor && !editor.document.isClosed ? editor : undefined;
  }

  /** Replaces each selection of the last text editor with `text`. */
  private async insert(text: string): Promise<void> {
    const editor = this.editor();
    if (!editor) {
      void vscode.window.showWarningMessage("StableLM: open a file to insert the code into.");
      return;
    }
    await editor.edit((edit) => {
      for (const selection of editor.selections) edit.replace(selection, text);
    });
    await vscode.window.showTextDocument(editor.document, editor.viewColumn);
  }

  /** Shows the view (command stablelm.openChat). */
  async reveal(): Promise<void> {
    await vscode.commands.executeCommand(`${ChatViewProvider.viewType}.focus`);
  }

  dispose(): void {
    for (const disposable of this.disposables) disposable.dispose();
  }
}

/** The webview's page: no inline script, everything else blocked by the content security policy. */
export function chatHtml(webview: vscode.Webview, script: vscode.Uri, style: vscode.Uri): string {
  const nonce = randomUUID().replace(/-/g, "");
  const csp = [
    "default-src 'none'",
    `style-src ${webview.cspSource}`,
    `script-src 'nonce-${nonce}'`,
    `img-src ${webview.cspSource} data:`,
  ].join("; ");
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta http-equiv="Content-Security-Policy" content="${csp}">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link rel="stylesheet" href="${webview.asWebviewUri(style)}">
<title>StableLM Chat</title>
</head>
<body>
<main id="transcript" aria-live="polite"></main>
<form id="ask">
<textarea id="question" rows="3" placeholder="Ask about the current file or the selection (Enter sends, Shift+Enter: new line)"></textarea>
<div class="buttons">
<button type="submit" id="send">Send</button>
<button type="button" id="stop" hidden>Stop</button>
<button type="button" id="clear" class="secondary">Clear</button>
</div>
</form>
<script nonce="${nonce}" src="${webview.asWebviewUri(script)}"></script>
</body>
</html>`;
}
