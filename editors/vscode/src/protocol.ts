// The stablelm-lsp protocol beyond standard LSP (README, "Protocol"): notifications for the
// model's state and chat deltas, one from the client for where the cursor rests, and
// workspace/executeCommand commands.

export const StatusNotification = "stablelm/status";
export const ChatDeltaNotification = "stablelm/chatDelta";
/** Client to server: the cursor rests here; the server prepares the completion there. */
export const FocusNotification = "stablelm/didFocus";

export interface FocusParams {
  uri: string;
  /** LSP position (0-based line, utf-16 character). */
  position: { line: number; character: number };
}

export const Commands = {
  /** Returns the last `ServerStatus` plus the completion counters. */
  status: "stablelm.status",
  /** One argument `ChatParams`; returns `ChatResult`, streams `ChatDelta`s meanwhile. */
  chat: "stablelm.chat",
  /** Sent by the client when the user accepts an inline completion item. */
  accepted: "stablelm.accepted",
} as const;

export type ServerState = "loading" | "ready" | "error" | "paused";

export interface ServerStatus {
  state: ServerState;
  model: string;
  builtin: boolean;
  device: string;
  dtype: string;
  message?: string;
  /** A remote engine: its URL (device is the URL too, dtype the engine's kind). */
  endpoint?: string;
  /** A remote engine's kind of failure (unreachable, timeout, http-500, ...) while state is "error". */
  fault?: string;
}

export interface StatusResult extends ServerStatus {
  completionsShown: number;
  completionsAccepted: number;
  /** How completion requests were answered (README, "Protocol"). */
  counters: Record<string, number>;
}

export type ChatRole = "system" | "user" | "assistant";

export interface ChatMessage {
  role: ChatRole;
  content: string;
}

export interface ChatContext {
  uri: string;
  /** LSP range (0-based lines, utf-16 characters) of the selection. */
  range?: { start: { line: number; character: number }; end: { line: number; character: number } };
}

export interface ChatParams {
  chatId: string;
  messages: ChatMessage[];
  context?: ChatContext;
}

export interface ChatDelta {
  chatId: string;
  delta: string;
}

export interface ChatResult {
  chatId: string;
  text: string;
  finishReason: string;
}

/** JSON-RPC error code of a request answered after `$/cancelRequest`. */
export const RequestCancelled = -32800;
