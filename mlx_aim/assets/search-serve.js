// The search page: sends the query to /api/search and draws the hits as a grid. Text from the index (file names)
// goes into the page as text nodes only, never as HTML.
"use strict";

const form = document.getElementById("search");
const box = document.getElementById("q");
const topK = document.getElementById("k");
const threshold = document.getElementById("threshold");
const statusLine = document.getElementById("status");
const grid = document.getElementById("grid");

function element(tag, props, children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children || []) node.append(child);
  return node;
}

function showStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

function hitCard(hit, rank) {
  const image = element("img", {src: "/thumb/" + hit.row, alt: hit.name, loading: "lazy"});
  const link = element("a", {className: "photo", href: "/photo/" + hit.row, target: "_blank", title: hit.path},
                       [image]);
  const more = element("button", {className: "more", type: "button", textContent: "more like this"});
  more.addEventListener("click", () => search("#" + hit.row));
  return element("div", {className: "hit"}, [
    link,
    element("div", {className: "score", textContent: "#" + rank + "  " + hit.score.toFixed(3)}),
    element("div", {className: "name", textContent: hit.name, title: hit.path}),
    more,
  ]);
}

async function search(query) {
  box.value = query;
  if (!query.trim()) return;
  const params = new URLSearchParams({q: query, k: topK.value || "40"});
  if (threshold.value !== "") params.set("threshold", threshold.value);
  if (location.hash !== "#" + params) history.pushState(null, "", "#" + params);
  showStatus("searching...");
  let answer;
  try {
    const response = await fetch("/api/search?" + params);
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
  } catch (error) {
    grid.replaceChildren();
    showStatus(String(error.message || error), true);
    return;
  }
  grid.replaceChildren(...answer.results.map((hit, i) => hitCard(hit, i + 1)));
  showStatus(answer.results.length + " of " + answer.num_images + " photos in " + answer.seconds.toFixed(2) +
             " s");
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  search(box.value);
});

function fromLocation() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("k")) topK.value = params.get("k");
  threshold.value = params.get("threshold") || "";
  if (params.get("q")) search(params.get("q"));
}
window.addEventListener("popstate", fromLocation);
fromLocation();
