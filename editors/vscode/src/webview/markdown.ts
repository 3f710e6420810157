// Markdown to HTML for chat replies. Raw HTML in a reply is escaped, not rendered (the model's
// output is untrusted), and every code block gets Copy and Insert buttons.
import MarkdownIt from "markdown-it";

const markdown = new MarkdownIt({ html: false, linkify: false, typographer: false });

function codeBlock(code: string, language: string): string {
  const escape = markdown.utils.escapeHtml;
  const languageClass = language ? ` class="language-${escape(language)}"` : "";
  return (
    `<div class="code-block">` +
    `<div class="code-actions"><span class="language">${escape(language)}</span>` +
    `<button type="button" data-action="copy" title="Copy to the clipboard">Copy</button>` +
    `<button type="button" data-action="insert" title="Insert at the cursor in the editor">Insert</button></div>` +
    `<pre><code${languageClass}>${escape(code)}</code></pre></div>\n`
  );
}

markdown.renderer.rules.fence = (tokens, index) => {
  const token = tokens[index];
  return codeBlock(token.content, token.info.trim().split(/\s+/)[0] ?? "");
};
markdown.renderer.rules.code_block = (tokens, index) => codeBlock(tokens[index].content, "");

/** HTML for `text`; an unclosed code fence (a reply still streaming) renders as a code block. */
export function renderMarkdown(text: string): string {
  return markdown.render(text);
}
