import * as assert from "node:assert/strict";
import { test } from "node:test";
import { renderMarkdown } from "../../src/webview/markdown";

test("code fences get Copy and Insert buttons and keep their language", () => {
  const html = renderMarkdown("Use this:\n\n```python\ndef f(x):\n    return x < 2\n```\n");
  assert.match(html, /<p>Use this:<\/p>/);
  assert.match(html, /<div class="code-block">/);
  assert.match(html, /data-action="copy"/);
  assert.match(html, /data-action="insert"/);
  assert.match(html, /<code class="language-python">def f\(x\):\n    return x &lt; 2\n<\/code>/);
});

test("an unclosed fence (a reply still streaming) is already a code block", () => {
  const html = renderMarkdown("```js\nconst a = 1;\n");
  assert.match(html, /<code class="language-js">const a = 1;\n<\/code>/);
});

test("raw HTML from the model is escaped, not rendered", () => {
  const html = renderMarkdown('<script>alert(1)</script> <img src=x onerror="alert(2)">');
  assert.doesNotMatch(html, /<script>/);
  assert.doesNotMatch(html, /<img/);
  assert.match(html, /&lt;script&gt;/);
});

test("javascript: links are not links", () => {
  const html = renderMarkdown("[click](javascript:alert(1))");
  assert.doesNotMatch(html, /href="javascript:/);
});

test("a language tag cannot break out of the class attribute", () => {
  const html = renderMarkdown('```x"><b>hi</b>\ncode\n```\n');
  assert.doesNotMatch(html, /<b>hi<\/b>/);
});

test("inline code, emphasis and lists render", () => {
  const html = renderMarkdown("Call `f()` **twice**:\n\n- one\n- two\n");
  assert.match(html, /<code>f\(\)<\/code>/);
  assert.match(html, /<strong>twice<\/strong>/);
  assert.match(html, /<li>one<\/li>/);
});
