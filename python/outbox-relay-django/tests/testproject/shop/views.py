from decimal import Decimal

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

from outbox_relay_django import publish_event
from testproject.shop.models import Order


def create_order(request: HttpRequest) -> HttpResponse:
    with transaction.atomic():
        order = Order.objects.create(
            customer=request.POST["customer"], total=Decimal(request.POST["total"])
        )
        publish_event(
            "order.created",
            {"order_id": order.pk, "customer": order.customer, "total": order.total},
        )
    return JsonResponse({"order_id": order.pk}, status=201)


def create_order_then_fail(request: HttpRequest) -> HttpResponse:
    try:
        with transaction.atomic():
            order = Order.objects.create(customer=request.POST["customer"], total=Decimal(1))
            publish_event("order.created", {"order_id": order.pk})
            raise RuntimeError("payment refused")
    except RuntimeError:
        return HttpResponse("payment refused", status=402)
