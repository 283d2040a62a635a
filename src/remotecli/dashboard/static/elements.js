// Building the page's elements from text. Text always goes in through textContent (or a
// property such as value), never as markup: labels, reasons and links come from the user or
// from a session, and the page must never run them.

/** A new `tag` element holding `text` (as text), with `className` when given. */
export function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

/** A `type="button"` button saying `label` that calls `onClick`. */
export function button(label, onClick, { disabled = false, className = "" } = {}) {
  const node = element("button", label, className);
  node.type = "button";
  node.disabled = disabled;
  node.addEventListener("click", onClick);
  return node;
}
