// Binds a plain <textarea> to a Y.Text: local edits become the smallest
// delete+insert, remote edits rewrite the value and keep the caret in place.

const LOCAL = Symbol("textarea");

// The one changed span between two strings: common prefix and suffix kept.
export function diffText(before, after) {
  let start = 0;
  const shortest = Math.min(before.length, after.length);
  while (start < shortest && before[start] === after[start]) start++;
  let endBefore = before.length;
  let endAfter = after.length;
  while (endBefore > start && endAfter > start && before[endBefore - 1] === after[endAfter - 1]) {
    endBefore--;
    endAfter--;
  }
  return { index: start, remove: endBefore - start, insert: after.slice(start, endAfter) };
}

// Where a position of the old text lands after a Yjs delta.
export function mapIndex(delta, index) {
  let oldPos = 0;
  let shift = 0;
  for (const op of delta) {
    if (op.retain !== undefined) {
      oldPos += op.retain;
    } else if (op.insert !== undefined) {
      if (oldPos < index) shift += typeof op.insert === "string" ? op.insert.length : 1;
    } else if (op.delete !== undefined) {
      if (oldPos < index) shift -= Math.min(op.delete, index - oldPos);
      oldPos += op.delete;
    }
    if (oldPos >= index) break;
  }
  return index + shift;
}

export function bindTextarea(textarea, ytext) {
  let shown = ytext.toString();
  textarea.value = shown;

  const onInput = () => {
    const { index, remove, insert } = diffText(shown, textarea.value);
    shown = textarea.value;
    if (!remove && !insert) return;
    ytext.doc.transact(() => {
      if (remove) ytext.delete(index, remove);
      if (insert) ytext.insert(index, insert);
    }, LOCAL);
  };

  const onChange = (event, transaction) => {
    if (transaction.origin === LOCAL) return;
    const focused = document.activeElement === textarea;
    const start = mapIndex(event.delta, textarea.selectionStart);
    const end = mapIndex(event.delta, textarea.selectionEnd);
    shown = ytext.toString();
    textarea.value = shown;
    if (focused) textarea.setSelectionRange(start, end);
  };

  textarea.addEventListener("input", onInput);
  ytext.observe(onChange);
  return () => {
    textarea.removeEventListener("input", onInput);
    ytext.unobserve(onChange);
  };
}
