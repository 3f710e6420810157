// Where the cursor rests, told to the server (stablelm/didFocus) so that it prepares the
// completion there before it is asked for: at once when an editor gets the focus (switching
// documents), and once the cursor has stayed put for a moment (the user reads, or pauses before
// typing on).
import type { FocusParams } from "./protocol";

/** Milliseconds the cursor stays put before its position is reported. */
export const FOCUS_IDLE_MS = 500;

/** The part of a vscode.TextEditor read here. */
export interface FocusEditor {
  document: { uri: { toString(): string } };
  selection: { active: { line: number; character: number } };
}

export class FocusReporter {
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly send: (params: FocusParams) => void,
    private readonly idleMs: number = FOCUS_IDLE_MS,
  ) {}

  /** Another editor has the focus (undefined: none): its cursor is reported at once. */
  activeEditorChanged(editor: FocusEditor | undefined): void {
    this.cancel();
    if (editor) this.report(editor);
  }

  /** The cursor moved (typing moves it too): reported once it stays put for `idleMs`. */
  selectionChanged(editor: FocusEditor): void {
    this.cancel();
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.report(editor);
    }, this.idleMs);
  }

  dispose(): void {
    this.cancel();
  }

  private cancel(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private report(editor: FocusEditor): void {
    // Positions are VS Code's: UTF-16 code units, as the server negotiates with VS Code.
    const { line, character } = editor.selection.active;
    this.send({ uri: editor.document.uri.toString(), position: { line, character } });
  }
}
